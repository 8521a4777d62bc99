import functools
import os
import pathlib
import shutil
from typing import Annotated

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, Minimum, parameterNodeWrapper
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode

from LiverTumorDARNLib.weights import BUNDLED, CUSTOM, MODEL_SOURCES
from LiverTumorDARNSceneLib.tasks import PANEL_POLL_MILLISECONDS, STAGE_NAMES, ModuleTasks, SegmentationOptions

# The Slicer side of LiverTumorDARN. The computation lives in the LiverTumorDARNLib package, the
# panel's work in LiverTumorDARNSceneLib (tasks: the segmentation job and the click session; scene:
# the MRML nodes), all tested without the application; this file wires them to the panel. At
# start-up Slicer imports this file before first use has installed torch and the pip packages, so
# it imports only what Slicer ships, and the light LiverTumorDARNLib.weights.

MODULE_DIR = os.path.dirname(__file__)
SAMPLE_SEED = 850000
"""The sample phantom's seed (LiverTumorDARNLib.phantom.SAMPLE_SEED, which a layout test compares):
importing the phantom module here would load scipy and SimpleITK at every Slicer start."""

SAMPLE_NAME = "LiverTumorPhantom"
SAMPLE_THUMBNAIL = os.path.join(MODULE_DIR, "Resources", "Icons", f"{SAMPLE_NAME}.png")
SAMPLE_PLACEHOLDER_URI = f"file:///LiverTumorDARN/is-drawn-locally/{SAMPLE_NAME}.nrrd"
"""The Sample Data module requires an address, but its button calls onPhantomSampleClicked instead of
downloading. SampleData.downloadSample(), which ignores that, finds no such file and fails at once:
no code path reaches the network. Scripts call LiverTumorDARNLogic().load_phantom()."""


#
# LiverTumorDARN
#


class LiverTumorDARN(ScriptedLoadableModule):
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Liver Tumor DARN")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["LiverTumorDARN developers"]
        self.parent.helpText = _("""
Liver and liver-tumor segmentation of contrast-enhanced CT with the DARN network
(Deep Attentive Refinement Network), with click-to-refine. For Slicer 5.8 and newer.
<p>This version can load a synthetic CT phantom with its liver and tumor segments, to try the
module without patient data. The bundled network weights are trained on synthetic phantoms,
for demonstration and research only: they are not for clinical use.</p>
See the <a href="https://github.com/livertumordarn/SlicerLiverTumorDARN">project page</a> for documentation.
""")
        self.parent.acknowledgementText = _("""
The network follows Y. Zhang et al., "DARN: Deep Attentive Refinement Network for Liver Tumor
Segmentation from 3D CT volume". Evaluation follows the Liver Tumor Segmentation Benchmark
(LiTS): P. Bilic et al., "The Liver Tumor Segmentation Benchmark (LiTS)", Medical Image Analysis, 2023.
""")
        # The Sample Data module exists once the application has started.
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData() -> None:
    """List the project's phantom case in the Sample Data module, with a thumbnail."""
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="Liver Tumor DARN",
        sampleName=SAMPLE_NAME,
        uris=SAMPLE_PLACEHOLDER_URI,
        fileNames=f"{SAMPLE_NAME}.nrrd",
        nodeNames=SAMPLE_NAME,
        thumbnailFileName=SAMPLE_THUMBNAIL,
        customDownloader=onPhantomSampleClicked,
    )


def onPhantomSampleClicked(source) -> None:
    """The Sample Data module's button: the phantom case, or a one-line error."""
    with slicer.util.tryWithErrorDisplay(_("Failed to load the phantom case."), waitCursor=True):
        loadPhantom(LiverTumorDARNLogic())


def loadPhantom(logic, seed: int = SAMPLE_SEED):
    """The phantom case of ``seed`` in the scene, with its true segments, shown; returns its volume.
    The Sample Data module and the panel's "Load phantom case" both come here."""
    volumeNode, _truthNode = logic.load_phantom(seed)
    slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)
    return volumeNode


#
# LiverTumorDARNParameterNode
#


@parameterNodeWrapper
class LiverTumorDARNParameterNode:
    """
    The parameters of the module, saved with the scene.

    inputVolume - The CT volume to segment.
    outputSegmentation - The segmentation that holds the "Liver" and the tumor segments.
    perTumor - One segment per tumor ("Liver tumor 1", "Liver tumor 2", ...) instead of one "Liver tumor".
    keepUncertainTumors - Keep the tumors the network is unsure of, which the weights' confidence
        floor would give back to the liver (more candidates, more false ones).
    resultsTable - One row per tumor (volume, longest axial diameter, mean HU, centroid).
    device - "auto", "cpu" or "cuda".
    modelSource - "bundled" (the weights shipped with the extension) or "custom" (customModelsFolder).
    customModelsFolder - A weights folder: manifest.json and the TorchScript files it lists.
    phantomSeed - Seed of the synthetic phantom that "Load phantom case" generates (default: the
        sample case of the Sample Data module and of "livertumordarn demo").
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    perTumor: bool = False
    keepUncertainTumors: bool = False
    resultsTable: vtkMRMLTableNode
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    modelSource: Annotated[str, Choice(list(MODEL_SOURCES))] = BUNDLED
    customModelsFolder: pathlib.Path
    phantomSeed: Annotated[int, Minimum(0)] = SAMPLE_SEED


#
# LiverTumorDARNWidget
#


class LiverTumorDARNWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: buttons and a timer wired to the Logic (LiverTumorDARNSceneLib.tasks.ModuleTasks),
    its segmentation job and its click session."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for scene observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._clickNode = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        # The layout lives in the .ui file; widgets with a SlicerParameterName are bound by connectGui.
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LiverTumorDARN.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LiverTumorDARNLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(PANEL_POLL_MILLISECONDS)
        self._timer.connect("timeout()", self.onPoll)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.loadPhantomButton.connect("clicked(bool)", self.onLoadPhantomButton)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.clickModeButton.connect("toggled(bool)", self.onClickModeToggled)
        self.ui.refineAllButton.connect("clicked(bool)", self.onRefineAllButton)
        self.ui.undoButton.connect("clicked(bool)", self.onUndoButton)
        self.ui.resultsTableView.connect("clicked(QModelIndex)", self.onResultClicked)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """The module (or the application) closes: no worker may outlive it."""
        self.cancelSegmentation()
        self.logic.close_click_session()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.ui.clickModeButton.checked = False
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.cancelSegmentation()
        self.ui.clickModeButton.checked = False
        self.logic.close_click_session()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.ui.resultsTableView.setMRMLTableNode(self._parameterNode.resultsTable)
            # connectGui names the choices "bundled" and "custom"
            self.ui.modelComboBox.setItemText(0, _("Bundled: {models}").format(models=self.logic.bundled_models_name()))
            self.ui.modelComboBox.setItemText(1, _("Custom weights folder"))
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        """The weights folder can be chosen only when the model is a custom one."""
        custom = self._parameterNode.modelSource == CUSTOM
        self.ui.modelsPathLabel.enabled = custom
        self.ui.modelsPathLineEdit.enabled = custom

    def modelsFolder(self) -> pathlib.Path:
        return self.logic.models_dir(self._parameterNode.modelSource, self._parameterNode.customModelsFolder)

    def onLoadPhantomButton(self) -> None:
        """The phantom becomes the input; its true segments stay in their own node for comparison."""
        with slicer.util.tryWithErrorDisplay(_("Failed to load the phantom case."), waitCursor=True):
            self._parameterNode.inputVolume = loadPhantom(self.logic, self._parameterNode.phantomSeed)
            self._parameterNode.outputSegmentation = None

    # ---------------------------------------------------------------- "Segment tumors"

    def onSegmentButton(self) -> None:
        if self._job is not None:
            self.cancelSegmentation()
            self.ui.statusLabel.text = _("Cancelled.")
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            p = self._parameterNode
            options = SegmentationOptions(self.modelsFolder(), p.device, p.perTumor, p.keepUncertainTumors)
            p.outputSegmentation = p.outputSegmentation or self.logic.new_segmentation(p.inputVolume)
            p.resultsTable = p.resultsTable or self.logic.new_results_table()
            self.ui.resultsTableView.setMRMLTableNode(p.resultsTable)
            self._job = self.logic.start_segmentation(p.inputVolume, p.outputSegmentation, p.resultsTable, options,
                                                      self.showProgress, self.showMessage)
            self.ui.segmentButton.text = _("Cancel")
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Starting...")
            self._timer.start()

    def cancelSegmentation(self) -> None:
        if self._job is not None:
            self._job.cancel()
        self._job = None
        self.ui.segmentButton.text = _("Segment tumors")

    def showProgress(self, stage: str, fraction: float) -> None:
        self.ui.progressBar.value = int(100 * fraction)
        self.ui.statusLabel.text = STAGE_NAMES.get(stage, stage)

    def showMessage(self, text: str) -> None:
        """In the panel, not in a dialog: a dialog's event loop would run the timer inside the poll."""
        self.ui.statusLabel.text = text
        slicer.util.showStatusMessage(text, 10000)

    def onPoll(self) -> None:
        """The timer, on Slicer's main thread (the only one that touches the scene): the job and the
        click session write what they finished."""
        job = self._job
        if job is not None:
            with slicer.util.tryWithErrorDisplay(_("Segmentation failed."), waitCursor=True):
                try:
                    if job.poll():
                        self.ui.progressBar.value = 100
                        self.showReport(job.report, self.ui.statusLabel, " ".join([_("Done."), *job.messages]))
                finally:
                    if job.finished and self._job is job:
                        self.cancelSegmentation()
        with slicer.util.tryWithErrorDisplay(_("Refinement failed."), waitCursor=True):
            edit = self.logic.poll_clicks(self._parameterNode.resultsTable if self._parameterNode else None)
            if edit is not None:
                self.showReport(edit.report, self.ui.refineStatusLabel, edit.message)
        if self._job is None and not self.logic.clicks_busy:
            self._timer.stop()

    def showReport(self, report, statusLabel, status: str) -> None:
        from LiverTumorDARNSceneLib.scene import summary

        if report is not None:
            self.ui.summaryLabel.text = summary(report)
        statusLabel.text = status

    def onResultClicked(self, index) -> None:
        from LiverTumorDARNSceneLib.scene import tumor_centroid_in_view_row

        table = self._parameterNode.resultsTable
        centroid = tumor_centroid_in_view_row(table, index.row()) if table else None
        if centroid is not None:
            slicer.modules.markups.logic().JumpSlicesToLocation(*centroid, True)

    # ---------------------------------------------------------------- click-to-refine

    def onClickModeToggled(self, enabled: bool) -> None:
        if not enabled:
            slicer.app.applicationLogic().GetInteractionNode().SwitchToViewTransformMode()
            return
        if self._clickNode is None or self._clickNode.GetScene() is None:
            self._clickNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "LiverTumorDARN clicks")
            self._clickNode.CreateDefaultDisplayNodes()
            self.addObserver(self._clickNode, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onPointPlaced)
        slicer.modules.markups.logic().SetActiveList(self._clickNode)
        slicer.modules.markups.logic().StartPlaceMode(True)  # stays in place mode: one click after another

    def onPointPlaced(self, caller, event) -> None:
        point = [0.0, 0.0, 0.0]
        caller.GetNthControlPointPositionWorld(caller.GetNumberOfControlPoints() - 1, point)
        positive = not self.ui.negativeCheckBox.checked
        self.startEdit(lambda session, volume, segmentation: session.click(volume, segmentation, point, positive))

    def onRefineAllButton(self) -> None:
        self.startEdit(lambda session, volume, segmentation: session.refine_all(volume, segmentation))

    def startEdit(self, start) -> None:
        """``start(session, volume, segmentation)`` starts an edit on the click session."""
        with slicer.util.tryWithErrorDisplay(_("Refinement failed."), waitCursor=True):
            p = self._parameterNode
            started = start(self.logic.click_session(p.device, self.modelsFolder()), p.inputVolume, p.outputSegmentation)
            self.ui.refineStatusLabel.text = _("Refining...") if started else _("Still working on the previous click.")
            self._timer.start()

    def onUndoButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Undo failed."), waitCursor=True):
            p = self._parameterNode
            edit = self.logic.undo(p.inputVolume, p.outputSegmentation, p.resultsTable)
            if edit is None:
                self.ui.refineStatusLabel.text = _("Nothing to undo.")
            else:
                self.showReport(edit.report, self.ui.refineStatusLabel, edit.message)


#
# LiverTumorDARNLogic
#


@functools.lru_cache(maxsize=None)  # once it has succeeded: it runs before every segmentation and click
def ensurePythonRequirements() -> None:
    """Install the pip packages of Resources/requirements.txt that are missing, after asking."""
    from LiverTumorDARNSceneLib import dependencies

    dependencies.ensure_python_requirements(os.path.join(MODULE_DIR, "Resources", "requirements.txt"),
                                            os.path.join(slicer.app.temporaryPath, "LiverTumorDARN-constraints.txt"))


@functools.lru_cache(maxsize=None)
def ensurePyTorch() -> None:
    """Have the PyTorch extension install or upgrade PyTorch, after asking."""
    from LiverTumorDARNSceneLib import dependencies

    dependencies.ensure_pytorch()


def pythonSlicer() -> list:
    """The command that runs Slicer's Python (a launcher that starts python-real) for the worker."""
    path = shutil.which("PythonSlicer")
    if not path:
        raise RuntimeError(_("PythonSlicer was not found next to Slicer."))
    return [path]


class LiverTumorDARNLogic(ModuleTasks, ScriptedLoadableModuleLogic):
    """The module's work, usable from the Python console without the panel (all of it is
    LiverTumorDARNSceneLib.tasks.ModuleTasks, tested without the application), e.g.::

        import LiverTumorDARN
        logic = LiverTumorDARN.LiverTumorDARNLogic()
        segmentation, report = logic.segment(volumeNode)
        edit = logic.click(volumeNode, segmentation, pointRas)

    ModuleTasks comes first: ScriptedLoadableModuleLogic.__init__ calls super().__init__() without
    arguments, which then reaches object, not ModuleTasks.
    """

    def __init__(self) -> None:
        ModuleTasks.__init__(self, slicer.mrmlScene, ensurePythonRequirements, ensurePyTorch, pythonSlicer,
                             slicer.util.startupEnvironment)
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return LiverTumorDARNParameterNode(super().getParameterNode())


#
# LiverTumorDARNTest
#


class LiverTumorDARNTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (Reload and Test, or ctest): the Logic and the panel end to end, on a small phantom."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (self.test_segment_refine_and_undo_through_the_logic,
                     self.test_the_panel_segments_and_its_cancel_ends_the_worker,
                     self.test_the_sample_data_entry_draws_the_sample_phantom):
            self.setUp()
            test()

    def test_segment_refine_and_undo_through_the_logic(self):
        from LiverTumorDARNSceneLib import scene

        logic = LiverTumorDARNLogic()
        volumeNode, truthNode = logic.load_phantom(seed=1, small=True)
        userSegmentId = truthNode.GetSegmentation().AddEmptySegment("", "User note")
        table = logic.new_results_table()
        self.delayDisplay("Segment tumors (worker process)")
        _node, report = logic.segment(volumeNode, truthNode, table, SegmentationOptions(device="cpu", per_tumor=True))
        tumorIds = scene.module_segment_ids(truthNode)["tumor"]
        self.assertEqual([truthNode.GetSegmentation().GetSegment(i).GetName() for i in tumorIds],
                         [f"Liver tumor {n}" for n in range(1, len(report.tumors) + 1)])
        self.assertEqual(truthNode.GetSegmentation().GetSegment(userSegmentId).GetName(), "User note")
        self.assertEqual(table.GetNumberOfRows(), len(report.tumors))
        self.delayDisplay("Refine all, then undo (click thread)")
        before = scene.labels_from_segments(truthNode, volumeNode)
        self.assertIn("refined", logic.refine_all(volumeNode, truthNode, table, device="cpu").message)
        logic.undo(volumeNode, truthNode, table)
        self.assertTrue((scene.labels_from_segments(truthNode, volumeNode) == before).all())
        self.delayDisplay("Test passed")

    def test_the_panel_segments_and_its_cancel_ends_the_worker(self):
        widget = slicer.modules.livertumordarn.widgetRepresentation().self()
        widget._parameterNode.inputVolume, _truth = widget.logic.load_phantom(seed=1, small=True)
        widget._parameterNode.outputSegmentation = None
        widget._parameterNode.device = "cpu"
        self.delayDisplay("Segment tumors, then Cancel")
        widget.onSegmentButton()
        job = widget._job
        widget.onSegmentButton()
        self.assertTrue(job.cancelled)
        self.assertFalse(job.worker_running)
        self.delayDisplay("Segment tumors to the end")
        widget.onSegmentButton()
        while widget._job is not None:
            slicer.app.processEvents()
        self.assertGreater(widget._parameterNode.resultsTable.GetNumberOfColumns(), 0)
        self.delayDisplay("Test passed")

    def test_the_sample_data_entry_draws_the_sample_phantom(self):
        import SampleData

        registerSampleData()
        sources = SampleData.SampleDataLogic.sampleDataSourcesByCategory("Liver Tumor DARN")
        source = [s for s in sources if s.sampleName == SAMPLE_NAME][-1]  # the last one: "Reload" registers anew
        source.customDownloader(source)
        self.assertIsNotNone(slicer.mrmlScene.GetFirstNodeByName(f"LiverPhantom{SAMPLE_SEED}"))
        self.delayDisplay("Test passed")
