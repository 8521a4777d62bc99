"""Every case of Testing/bad_inputs.py: its exit status, one line that names the problem (on a
failure), and no file changed or left behind: an output that existed is kept byte for byte, an
input is never replaced, and nothing half-written remains."""

import pytest

from bad_inputs import BAD_INPUTS, run


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=lambda bad: bad.name)
def test_bad_input_gets_its_exit_status_and_message_and_changes_no_file(bad, models_dir, tmp_path):
    outcome = run(bad, tmp_path, models_dir)
    assert (outcome.exit_status, outcome.changed, outcome.created) == (bad.exit_status, [], [])
    assert bad.expected in outcome.message
    assert outcome.message.startswith("livertumordarn: ") or bad.exit_status == 0
    assert not list(tmp_path.rglob(".*partial*"))
