import os

import numpy as np
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

# The Slicer side of LiverTumorDARN. Everything that is not GUI or scene work lives in the
# LiverTumorDARNLib package next to this file (plain Python, tested without Slicer).

#: Segments in label-value order: label 1 is the liver, label 2 the tumor (as in LiverTumorDARNLib).
SEGMENTS = (
    ("Liver", (221 / 255, 130 / 255, 101 / 255)),
    ("Liver tumor", (250 / 255, 220 / 255, 80 / 255)),
)


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


#
# LiverTumorDARNParameterNode
#


@parameterNodeWrapper
class LiverTumorDARNParameterNode:
    """
    The parameters of the module, saved with the scene.

    inputVolume - The CT volume to segment.
    outputSegmentation - The segmentation that holds the "Liver" and "Liver tumor" segments.
    phantomSeed - Seed of the synthetic phantom that "Load phantom case" generates.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    phantomSeed: int = 0


#
# LiverTumorDARNWidget
#


class LiverTumorDARNWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for scene observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        # The layout lives in the .ui file (Qt Designer); widgets with a SlicerParameterName
        # property are bound to the parameter node by connectGui.
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LiverTumorDARN.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = LiverTumorDARNLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.loadPhantomButton.connect("clicked(bool)", self.onLoadPhantomButton)
        # "Segment tumors" (the DARN network) is added here once the network exists.

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
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
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    def onLoadPhantomButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to load the phantom case."), waitCursor=True):
            ensurePythonRequirements()
            volumeNode, segmentationNode = self.logic.loadPhantomCase(self._parameterNode.phantomSeed)
            self._parameterNode.inputVolume = volumeNode
            self._parameterNode.outputSegmentation = segmentationNode
            slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)


def ensurePythonRequirements() -> None:
    """Install the packages listed in Resources/requirements.txt that are missing, after asking."""
    import importlib
    import importlib.metadata
    import re

    requirementsPath = os.path.join(os.path.dirname(__file__), "Resources", "requirements.txt")
    try:
        # Slicer Preview releases from 2026 on. (Not "import slicer.packaging": that would make
        # "slicer" a local name of this function.)
        packaging = importlib.import_module("slicer.packaging")
    except ImportError:
        packaging = None
    if packaging:
        packaging.pip_ensure(packaging.load_requirements(requirementsPath), requester="Liver Tumor DARN")
        return

    # Older Slicer: check the installed distributions, ask, then pip install what is missing.
    with open(requirementsPath) as requirementsFile:
        requirements = [line.strip() for line in requirementsFile if line.strip() and not line.startswith("#")]
    missing = []
    for requirement in requirements:
        try:
            importlib.metadata.distribution(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0])
        except importlib.metadata.PackageNotFoundError:
            missing.append(requirement)
    if not missing:
        return
    if not slicer.util.confirmOkCancelDisplay(
        _("Liver Tumor DARN needs these Python packages: {packages}. Install them now?").format(packages=", ".join(missing))
    ):
        raise RuntimeError(_("The required Python packages are not installed."))
    slicer.util.pip_install(missing)


#
# LiverTumorDARNLogic
#


class LiverTumorDARNLogic(ScriptedLoadableModuleLogic):
    """Scene work of the module, usable from the Python console without the GUI.

    The computation itself lives in LiverTumorDARNLib; this class only moves images
    between SimpleITK and MRML nodes. Methods take the scene as an argument so that they
    also work where there is no slicer.mrmlScene (the slicer-core Python package).
    """

    def getParameterNode(self):
        return LiverTumorDARNParameterNode(super().getParameterNode())

    def loadPhantomCase(self, seed: int, small: bool = False, scene=None):
        """Generate a synthetic CT phantom and add it to the scene.

        Returns (volumeNode, segmentationNode): the CT in Hounsfield units and a segmentation
        with the "Liver" and "Liver tumor" segments, on the same grid.
        """
        from LiverTumorDARNLib.phantom import generate_case

        if scene is None:
            scene = slicer.mrmlScene
        case = generate_case(seed, small=small)
        name = f"LiverPhantom{seed}"

        volumeNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        self.setVolumeFromImage(volumeNode, case.image)
        volumeNode.CreateDefaultDisplayNodes()

        segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name} segmentation")
        segmentationNode.CreateDefaultDisplayNodes()
        self.setSegmentsFromLabels(segmentationNode, case.labels, volumeNode, scene)
        return volumeNode, segmentationNode

    @staticmethod
    def setVolumeFromImage(volumeNode, image) -> None:
        """Copy the voxels and the geometry of a SimpleITK image into a volume node."""
        import SimpleITK as sitk

        # SimpleITK's array is indexed (k, j, i), the same order as slicer.util.arrayFromVolume.
        slicer.util.updateVolumeFromArray(volumeNode, sitk.GetArrayFromImage(image))
        ijkToLps = np.eye(4)
        ijkToLps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
        ijkToLps[:3, 3] = image.GetOrigin()
        lpsToRas = np.diag([-1.0, -1.0, 1.0, 1.0])
        volumeNode.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(lpsToRas @ ijkToLps))

    @classmethod
    def setSegmentsFromLabels(cls, segmentationNode, labels, referenceVolumeNode, scene) -> None:
        """Fill the SEGMENTS of a segmentation node from a label image (0 background, 1 liver, 2 tumor).

        Goes through a temporary label map node: slicer.util.updateSegmentBinaryLabelmapFromArray
        needs slicer.modules, which the slicer-core package does not have.
        """
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
        segmentation = segmentationNode.GetSegmentation()
        segmentIds = vtk.vtkStringArray()  # label value n is imported into segmentIds[n - 1]
        for segmentName, color in SEGMENTS:
            segmentId = segmentation.GetSegmentIdBySegmentName(segmentName) or segmentation.AddEmptySegment("", segmentName, color)
            segmentIds.InsertNextValue(segmentId)

        labelmapNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        try:
            cls.setVolumeFromImage(labelmapNode, labels)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmapNode, segmentationNode, segmentIds):
                raise RuntimeError(_("Could not import the label image into the segmentation."))
        finally:
            scene.RemoveNode(labelmapNode)


#
# LiverTumorDARNTest
#


class LiverTumorDARNTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (Reload and Test, or ctest): the module's scenario end to end."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_load_phantom_case_adds_the_ct_and_both_segments()

    def test_load_phantom_case_adds_the_ct_and_both_segments(self):
        import SimpleITK as sitk
        from LiverTumorDARNLib.phantom import generate_case

        self.delayDisplay("Loading a small phantom case")
        volumeNode, segmentationNode = LiverTumorDARNLogic().loadPhantomCase(seed=1, small=True)

        expected = sitk.GetArrayFromImage(generate_case(1, small=True).image)
        voxels = slicer.util.arrayFromVolume(volumeNode)
        self.assertEqual(voxels.shape, expected.shape)
        np.testing.assert_array_equal(voxels, expected)

        segmentation = segmentationNode.GetSegmentation()
        for segmentName, _color in SEGMENTS:
            self.assertTrue(segmentation.GetSegmentIdBySegmentName(segmentName), f"missing segment {segmentName}")
        self.delayDisplay("Test passed")
