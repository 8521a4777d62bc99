"""Every bad input of Testing/bad_inputs.py: one line naming the problem, a non-zero exit, and no
output written (an output that existed before is left as it was)."""

import pytest

from bad_inputs import BAD_INPUTS, run


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=lambda bad: bad.name)
def test_bad_input_gets_one_line_a_non_zero_exit_and_no_output(bad, models_dir, tmp_path):
    outcome = run(bad, tmp_path, models_dir)
    assert outcome.exit_status == bad.exit_status
    assert outcome.message.startswith("livertumordarn: ") and bad.expected in outcome.message
    if bad.keeps_output is not None:
        assert outcome.output.read_bytes() == bad.keeps_output
    else:
        assert not outcome.output.exists()
    assert not list(tmp_path.rglob(".*partial*"))
