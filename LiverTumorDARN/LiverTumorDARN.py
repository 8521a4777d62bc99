import functools
import json
import os
import pathlib
import queue
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
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

from LiverTumorDARNLib.phantom import SAMPLE_SEED
from LiverTumorDARNLib.weights import BUNDLED, CUSTOM, MODEL_SOURCES

# The Slicer side of LiverTumorDARN. The computation lives in the LiverTumorDARNLib package (plain
# Python, tested without Slicer) and the scene work in LiverTumorDARNSceneLib.scene (tested in CI
# against Slicer's real MRML classes); this file holds only the panel and its thin logic.

MODULE_DIR = os.path.dirname(__file__)
POLL_MILLISECONDS = 100
STAGE_NAMES = {"liver": "Finding the liver", "tumor": "Segmenting tumors", "done": "Writing the segments"}

SAMPLE_NAME = "LiverTumorPhantom"
SAMPLE_THUMBNAIL = os.path.join(MODULE_DIR, "Resources", "Icons", f"{SAMPLE_NAME}.png")
SAMPLE_PLACEHOLDER_URI = f"file:///LiverTumorDARN/is-drawn-locally/{SAMPLE_NAME}.nrrd"
"""The Sample Data module requires an address, but its button calls onPhantomSampleClicked instead of
downloading. SampleData.downloadSample(), which ignores that, finds no such file and fails at once:
no code path reaches the network. Scripts call loadPhantomSample()."""


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
(Deep Attentive Refinement Network), with click-to-refine.
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
        loadPhantomSample()


def loadPhantomSample(seed: int = SAMPLE_SEED):
    """Draw the phantom case of ``seed`` (the project's sample case by default), add it to the scene
    with its true segments and show it; returns (volume node, segmentation node).

    The Sample Data module and the panel's "Load phantom case" both come here, so they give the
    same case the same way. Nothing is downloaded: the phantom is drawn from its seed.
    """
    from LiverTumorDARNSceneLib import scene

    ensurePythonRequirements()
    volumeNode, segmentationNode = scene.add_phantom_case(slicer.mrmlScene, seed)
    slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)
    return volumeNode, segmentationNode


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
    """The panel: inputs, "Segment tumors" (a subprocess, so Slicer never freezes), results,
    click-to-refine (a persistent worker thread, so the network's caches stay warm)."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for scene observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._process = None
        self._records = queue.Queue()
        self._workFolder = None
        self._clickThread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="LiverTumorDARN-clicks")
        self._pendingEdit = None
        self._clickNode = None
        self._timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        # The layout lives in the .ui file (Qt Designer); widgets with a SlicerParameterName
        # property are bound to the parameter node by connectGui.
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LiverTumorDARN.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = LiverTumorDARNLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MILLISECONDS)
        self._timer.connect("timeout()", self.onPoll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.loadPhantomButton.connect("clicked(bool)", self.onLoadPhantomButton)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.clickModeButton.connect("toggled(bool)", self.onClickModeToggled)
        self.ui.refineAllButton.connect("clicked(bool)", self.onRefineAllButton)
        self.ui.resultsTableView.connect("clicked(QModelIndex)", self.onResultClicked)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.cancelSegmentation()
        self._clickThread.shutdown(wait=False)
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
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.ui.resultsTableView.setMRMLTableNode(self._parameterNode.resultsTable)
            self.nameModelChoices()
            self.onParameterNodeModified()

    def nameModelChoices(self) -> None:
        """Give the model choices readable names (connectGui fills the combo box with the bare
        choices, "bundled" and "custom"), the bundled one saying which DARN it is."""
        from LiverTumorDARNLib.weights import bundled_models_dir, describe_models

        self.ui.modelComboBox.setItemText(0, _("Bundled: {models}").format(models=describe_models(bundled_models_dir())))
        self.ui.modelComboBox.setItemText(1, _("Custom weights folder"))

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        """The weights folder can be chosen only when the model is a custom one."""
        custom = self._parameterNode.modelSource == CUSTOM
        self.ui.modelsPathLabel.enabled = custom
        self.ui.modelsPathLineEdit.enabled = custom

    def modelsFolder(self) -> pathlib.Path:
        """The weights folder the panel names, checked (a wrong one raises a one-line InputError)."""
        return self.logic.modelsDirectory(self._parameterNode.modelSource, self._parameterNode.customModelsFolder)

    def onLoadPhantomButton(self) -> None:
        """Load the phantom of the chosen seed and make it the input; its true segments stay in their
        own node for comparison, and "Segment tumors" writes into a new segmentation."""
        with slicer.util.tryWithErrorDisplay(_("Failed to load the phantom case."), waitCursor=True):
            volumeNode, _truthNode = loadPhantomSample(self._parameterNode.phantomSeed)
            self._parameterNode.inputVolume = volumeNode
            self._parameterNode.outputSegmentation = None

    # ---------------------------------------------------------------- "Segment tumors"

    def onSegmentButton(self) -> None:
        if self._process is not None:
            self.cancelSegmentation()
            self.ui.statusLabel.text = _("Cancelled.")
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            volumeNode = self._parameterNode.inputVolume
            if not volumeNode:
                raise ValueError(_("Select a CT volume first."))
            modelsFolder = self.modelsFolder()
            ensurePyTorch()
            ensurePythonRequirements()
            if not self._parameterNode.outputSegmentation:
                self._parameterNode.outputSegmentation = slicer.mrmlScene.AddNewNodeByClass(
                    "vtkMRMLSegmentationNode", volumeNode.GetName() + " liver and tumors")
                self._parameterNode.outputSegmentation.CreateDefaultDisplayNodes()
            self._workFolder = tempfile.mkdtemp(prefix="LiverTumorDARN-")
            self._process = self.logic.startSegmentation(volumeNode, self._workFolder, self._parameterNode.device,
                                                         modelsFolder, self._parameterNode.keepUncertainTumors)
            threading.Thread(target=readRecords, args=(self._process, self._records), daemon=True).start()
            self.ui.segmentButton.text = _("Cancel")
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Starting...")
            self._timer.start()

    def cancelSegmentation(self) -> None:
        if self._process is not None:
            self._process.kill()
        self._finishSegmentation()

    def _finishSegmentation(self) -> None:
        self._process = None
        self._records = queue.Queue()
        if self._workFolder:
            shutil.rmtree(self._workFolder, ignore_errors=True)
            self._workFolder = None
        self.ui.segmentButton.text = _("Segment tumors")
        if self._pendingEdit is None:
            self._timer.stop()

    def onPoll(self) -> None:
        """Drain what the subprocess and the click thread reported (this runs on Slicer's main
        thread, the only one that may touch the scene)."""
        self._pollClick()
        if self._process is None:
            return
        error = None
        while not self._records.empty():
            record = self._records.get()
            if "stage" in record:
                self.ui.progressBar.value = int(100 * record["fraction"])
                self.ui.statusLabel.text = STAGE_NAMES.get(record["stage"], record["stage"])
            elif "message" in record:
                slicer.util.warningDisplay(record["message"])
            elif "error" in record:
                error = record["error"]
            elif "output" in record:
                self.ui.statusLabel.text = record["output"]
        if self._process.poll() is None or not self._records.empty():
            return
        returnCode, labelsPath = self._process.returncode, os.path.join(self._workFolder, "labels.nrrd")
        with slicer.util.tryWithErrorDisplay(_("Segmentation failed."), waitCursor=True):
            try:
                if returnCode != 0:
                    raise RuntimeError(error or _("The segmentation process stopped with status {code}.").format(code=returnCode))
                report = self.logic.loadResult(labelsPath, self._parameterNode.inputVolume,
                                               self._parameterNode.outputSegmentation, self._resultsTable(),
                                               self._parameterNode.perTumor)
                self.showReport(report)
            finally:
                self._finishSegmentation()

    def _resultsTable(self):
        if not self._parameterNode.resultsTable:
            self._parameterNode.resultsTable = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", "Liver tumors")
            self.ui.resultsTableView.setMRMLTableNode(self._parameterNode.resultsTable)
        return self._parameterNode.resultsTable

    def showReport(self, report) -> None:
        from LiverTumorDARNSceneLib import scene

        self.ui.summaryLabel.text = scene.summary(report)
        self.ui.statusLabel.text = _("Done.")
        self.ui.progressBar.value = 100

    def onResultClicked(self, index) -> None:
        table = self._parameterNode.resultsTable
        if not table:
            return
        r, a, s = (float(table.GetCellText(index.row(), column)) for column in (4, 5, 6))
        slicer.modules.markups.logic().JumpSlicesToLocation(r, a, s, True)

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
        if self._pendingEdit is not None:
            self.ui.refineStatusLabel.text = _("Still working on the previous click.")
            return
        point = [0.0, 0.0, 0.0]
        caller.GetNthControlPointPositionWorld(caller.GetNumberOfControlPoints() - 1, point)
        positive = not self.ui.negativeCheckBox.checked
        self._submitEdit(lambda refiner, ct, labels, pointIjk: refiner.click(ct, labels, pointIjk, positive), point)

    def onRefineAllButton(self) -> None:
        self._submitEdit(lambda refiner, ct, labels, pointIjk: refiner.refine_all(ct, labels))

    def _submitEdit(self, edit, pointRas=None) -> None:
        """Run ``edit(refiner, ct, labels, pointIjk)`` on the click thread. Everything it needs from
        the scene and the panel is read here, on the main thread: Qt widgets and MRML nodes must not
        be touched from another thread."""
        with slicer.util.tryWithErrorDisplay(_("Refinement failed."), waitCursor=True):
            ensurePyTorch()
            ensurePythonRequirements()
            volume, segmentation = self._parameterNode.inputVolume, self._parameterNode.outputSegmentation
            ct, labels = self.logic.editInputs(volume, segmentation)
            pointIjk = self.logic.rasToIjk(volume, pointRas) if pointRas is not None else None
            device, modelsFolder = self._parameterNode.device, self.modelsFolder()
            refiner = lambda: self.logic.refiner(device, modelsFolder)
            self._pendingEdit = (self._clickThread.submit(lambda: edit(refiner(), ct, labels, pointIjk)), volume, segmentation)
            self.ui.refineStatusLabel.text = _("Refining...")
            self._timer.start()

    def _pollClick(self) -> None:
        if self._pendingEdit is None or not self._pendingEdit[0].done():
            return
        future, volume, segmentation = self._pendingEdit
        self._pendingEdit = None
        if self._process is None:
            self._timer.stop()
        with slicer.util.tryWithErrorDisplay(_("Refinement failed."), waitCursor=True):
            change = future.result()
            saveStateForUndo(segmentation, volume)
            self.logic.applyChange(volume, segmentation, change, self._resultsTable())
            self.ui.refineStatusLabel.text = change.message
            self.showReport(self.logic.lastReport)


def readRecords(process, records: queue.Queue) -> None:
    """The reader thread: every line of the subprocess, parsed, into the queue (never the scene)."""
    for line in process.stdout:
        try:
            records.put(json.loads(line))
        except ValueError:
            records.put({"output": line.strip()})


def saveStateForUndo(segmentationNode, volumeNode) -> None:
    """Let the Segment Editor's Undo take back the next change of ``segmentationNode``."""
    editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
    if editor.segmentationNode() is not segmentationNode:
        editor.setSegmentationNode(segmentationNode)
        editor.setSourceVolumeNode(volumeNode)
    editor.saveStateForUndo()


@functools.cache  # once it has succeeded: it runs before every click
def ensurePyTorch() -> None:
    """Have the PyTorch extension install PyTorch (a build that fits this machine's GPU) if it is
    missing, after the user agrees; the extension is a dependency of this one."""
    from LiverTumorDARNSceneLib.dependencies import TORCH_REQUIREMENT

    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        raise RuntimeError(_("Liver Tumor DARN needs the PyTorch extension: install \"PyTorch\" from the "
                             "Extensions Manager, restart Slicer and try again.")) from None
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    if not torchLogic.torchInstalled() and torchLogic.installTorch(
            askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT) is None:
        raise RuntimeError(_("PyTorch was not installed; Liver Tumor DARN needs it to segment."))


@functools.cache  # once it has succeeded: it runs before every click
def ensurePythonRequirements() -> None:
    """Install the packages of Resources/requirements.txt that are missing, after asking once,
    without replacing any package Slicer ships (see LiverTumorDARNSceneLib.dependencies)."""
    from LiverTumorDARNSceneLib import dependencies

    requirementsPath = os.path.join(MODULE_DIR, "Resources", "requirements.txt")
    constraintsPath = dependencies.write_constraints(os.path.join(slicer.app.temporaryPath, "LiverTumorDARN-constraints.txt"))
    packaging = slicerPipEnsureModule()
    if packaging:
        packaging.pip_ensure(packaging.load_requirements(requirementsPath), constraints=constraintsPath,
                             requester="Liver Tumor DARN")
        return
    missing = dependencies.missing_requirements(dependencies.read_requirements(requirementsPath))
    if not missing:
        return
    if not slicer.util.confirmOkCancelDisplay(
        _("Liver Tumor DARN needs these Python packages: {packages}. Install them now?").format(packages=", ".join(missing))
    ):
        raise RuntimeError(_("The required Python packages are not installed."))
    slicer.util.pip_install(missing + ["-c", str(constraintsPath)])


def slicerPipEnsureModule():
    """Slicer's module with pip_ensure and load_requirements (slicer.packaging, called slicer.pydeps
    in some 5.11 previews), or None in releases that have neither."""
    import importlib  # not "import slicer.packaging": that would make "slicer" a local name here

    for name in ("slicer.packaging", "slicer.pydeps"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "pip_ensure"):
            return module
    return None


#
# LiverTumorDARNLogic
#


class LiverTumorDARNLogic(ScriptedLoadableModuleLogic):
    """Scene work of the module, usable from the Python console without the GUI.

    The computation lives in LiverTumorDARNLib and the node handling in LiverTumorDARNSceneLib.scene;
    this class ties them to the application (its Python, its scene, the persistent refiner).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._refiner = None
        self._refinerKey = None
        self.lastReport = None

    def getParameterNode(self):
        return LiverTumorDARNParameterNode(super().getParameterNode())

    @staticmethod
    def modelsDirectory(source: str = BUNDLED, customFolder: pathlib.Path = pathlib.Path()) -> pathlib.Path:
        """The weights folder of a model choice (BUNDLED or CUSTOM), its files checked."""
        from LiverTumorDARNLib.weights import chosen_models_dir

        return chosen_models_dir(source, customFolder)

    def startSegmentation(self, volumeNode, workFolder: str, device: str, modelsFolder: pathlib.Path,
                          keepUncertainTumors: bool = False):
        """Write the CT (world geometry) to ``workFolder`` and start the worker process on it."""
        import SimpleITK as sitk

        from LiverTumorDARNSceneLib import scene

        ctPath = os.path.join(workFolder, "ct.nrrd")
        sitk.WriteImage(scene.image_from_volume(volumeNode), ctPath)
        pythonSlicer = shutil.which("PythonSlicer")
        if not pythonSlicer:
            raise RuntimeError(_("PythonSlicer was not found next to Slicer."))
        command = [pythonSlicer, "-m", "LiverTumorDARNSceneLib.worker", ctPath, os.path.join(workFolder, "labels.nrrd"),
                   "--models", str(modelsFolder), "--device", device]
        if keepUncertainTumors:
            command += ["--min-tumor-confidence", "0"]
        environment = {"PYTHONPATH": os.pathsep.join([MODULE_DIR, os.environ.get("PYTHONPATH", "")])}
        return slicer.util.launchConsoleProcess(command, updateEnvironment=environment)

    def loadResult(self, labelsPath: str, volumeNode, segmentationNode, tableNode, perTumor: bool = False):
        """The worker's label map into the module's segments and the results table."""
        import SimpleITK as sitk

        from LiverTumorDARNSceneLib import scene

        labels = sitk.GetArrayFromImage(sitk.ReadImage(labelsPath))
        scene.write_segments(segmentationNode, volumeNode, labels, perTumor)
        self.lastReport = scene.measure(scene.image_from_volume(volumeNode), labels)
        scene.write_results_table(tableNode, self.lastReport)
        return self.lastReport

    def refiner(self, device: str, modelsFolder: pathlib.Path):
        """The refinement network, loaded once per device and weights folder (on the click thread)."""
        from LiverTumorDARNLib.pipeline import resolve_device
        from LiverTumorDARNLib.refine import Refiner

        key = (device, modelsFolder)
        if self._refiner is None or self._refinerKey != key:
            self._refiner = Refiner.load(modelsFolder, resolve_device(device))
            self._refinerKey = key
        return self._refiner

    @staticmethod
    def editInputs(volumeNode, segmentationNode):
        """The CT and the current label array an edit starts from (read on the main thread)."""
        from LiverTumorDARNSceneLib import scene

        return scene.image_from_volume(volumeNode), scene.labels_from_segments(segmentationNode, volumeNode)

    @staticmethod
    def rasToIjk(volumeNode, pointRas):
        from LiverTumorDARNSceneLib import scene

        return scene.ras_to_ijk(volumeNode, pointRas)

    def applyChange(self, volumeNode, segmentationNode, change, tableNode) -> None:
        """Write a refinement's changed box into the segments and update the results."""
        from LiverTumorDARNSceneLib import scene

        scene.apply_change(segmentationNode, volumeNode, change.labels, change.box)
        self.lastReport = scene.measure(scene.image_from_volume(volumeNode), change.labels)
        scene.write_results_table(tableNode, self.lastReport)


#
# LiverTumorDARNTest
#


class LiverTumorDARNTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (Reload and Test, or ctest): the panel's scenario end to end, on phantoms."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_tumors_one_segment_each_then_refine_all_through_the_panel()
        self.setUp()
        self.test_the_sample_data_entry_draws_the_sample_phantom()

    def test_segment_tumors_one_segment_each_then_refine_all_through_the_panel(self):
        from LiverTumorDARNSceneLib import scene

        self.delayDisplay("Loading a small phantom case")
        widget = slicer.modules.livertumordarn.widgetRepresentation().self()
        volumeNode, truthNode = scene.add_phantom_case(slicer.mrmlScene, seed=1, small=True)
        userSegmentId = truthNode.GetSegmentation().AddEmptySegment("", "User note")
        widget._parameterNode.inputVolume = volumeNode
        widget._parameterNode.outputSegmentation = truthNode  # holds a user segment that must survive
        widget._parameterNode.device = "cpu"
        widget._parameterNode.perTumor = True

        self.delayDisplay("Segment tumors (subprocess)")
        widget.onSegmentButton()
        while widget._process is not None:
            slicer.app.processEvents()
        segmentation = truthNode.GetSegmentation()
        tumorNames = [segmentation.GetSegment(i).GetName() for i in scene.module_segment_ids(truthNode)["tumor"]]
        self.assertEqual(tumorNames, [f"Liver tumor {n}" for n in range(1, len(widget.logic.lastReport.tumors) + 1)])
        self.assertEqual(segmentation.GetSegment(userSegmentId).GetName(), "User note")
        self.assertEqual(widget._parameterNode.resultsTable.GetNumberOfRows(), len(widget.logic.lastReport.tumors))

        self.delayDisplay("Refine all tumors (click thread)")
        widget.onRefineAllButton()
        while widget._pendingEdit is not None:
            slicer.app.processEvents()
        self.assertTrue(widget.ui.refineStatusLabel.text.endswith("refined") or "no change" in widget.ui.refineStatusLabel.text)
        self.delayDisplay("Test passed")

    def test_the_sample_data_entry_draws_the_sample_phantom(self):
        import SampleData

        registerSampleData()
        sources = SampleData.SampleDataLogic.sampleDataSourcesByCategory("Liver Tumor DARN")
        source = [s for s in sources if s.sampleName == SAMPLE_NAME][-1]  # the last one: "Reload" registers anew
        source.customDownloader(source)
        self.assertIsNotNone(slicer.mrmlScene.GetFirstNodeByName(f"LiverPhantom{SAMPLE_SEED}"))
        self.delayDisplay("Test passed")
