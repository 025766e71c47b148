"""Install check: every component imports, mmcv has its compiled ops, and CI runs README's command."""
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


MODULES = ["torch", "torchvision", "mmcv", "mmdet", "segment_anything", "sam2", "cocotb", "ahcq", "projects"]


@pytest.mark.parametrize("module", MODULES)
def test_imports(module: str) -> None:
    importlib.import_module(module)


def test_mmcv_compiled_ops() -> None:
    import torch
    from mmcv.ops import nms

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    _, keep = nms(boxes, scores, iou_threshold=0.5)
    assert keep.tolist() == [0, 2]


def test_pinned_versions() -> None:
    import mmcv
    import mmdet
    import torch

    assert torch.__version__.startswith("2.14.1")
    assert mmcv.__version__ == "1.7.2"
    assert mmdet.__version__ == "2.28.2"


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"TEST_CMD='([^']+)'", ci).group(1)
    readme = (ROOT / "README.md").read_text()
    assert f"bash environment.sh && {command}" in readme
