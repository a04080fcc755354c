"""Segmentation model specs and the user's own model code (issue 11, items 1 and 3).

* ``demo-seg`` and ``torchvision-seg:ARCH[:W|random]``: task, classes, background class,
  recommended layer, output ``(B, K, H, W)``; small inputs (64 px) keep them fast.
* ``python:FILE.py:CLASS:W``: a model class in a temp folder loads (classification and a
  UNet-style segmentation variant), with a sidecar ``model.json``; it is refused unless code is
  allowed (``allow_code=True``, :func:`user_code_allowed`, or this thread's trusted files), also
  when the process already holds it (:func:`shared_model`).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from explorer_core.errors import ExplorerError
from explorer_core.models import (
    KNOWN_SPECS,
    SEG_ARCHS,
    SEG_SHARE_THRESHOLD,
    UserCodeRefused,
    code_file,
    forget_shared_models,
    load_model,
    parse_spec,
    shared_model,
)
from explorer_core.trust import set_code_trust, user_code_allowed

USER_MODELS = '''
import torch
from torch import nn


class TinyClassifier(nn.Module):
    """(B, 3, S, S) -> (B, classes) logits."""

    def __init__(self, classes=3, width=8):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, 2, 1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, 2, 1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.pool(self.relu2(self.conv2(self.relu(self.conv(x))))).flatten(1))


class TinyUNet(nn.Module):
    """A UNet-style segmenter: encoder, bottleneck, decoder with a skip; (B, K, H, W) logits."""

    def __init__(self, classes=4):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.bottleneck = nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
        self.up = nn.Upsample(scale_factor=4, mode="bilinear", align_corners=False)
        self.dec = nn.Sequential(nn.Conv2d(24, 8, 3, 1, 1), nn.ReLU())
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x):
        e = self.enc(x)
        b = self.bottleneck(self.down(e))
        return self.head(self.dec(torch.cat([self.up(b), e], 1)))


class NeedsArgs(nn.Module):
    def __init__(self, depth):
        super().__init__()
        self.conv = nn.Conv2d(3, depth, 1)

    def forward(self, x):
        return self.conv(x)


class Maps(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.conv(x)[:, 0]  # (B, H, W): neither logits nor per-pixel logits


class DictOut(TinyUNet):
    def forward(self, x):
        return {"out": super().forward(x), "aux": None}
'''


def user_model(folder: Path, cls: str, sidecar: dict | None = None, classes: list[str] | None
               = None, *, code: str = USER_MODELS, build_kwargs: dict | None = None) -> str:
    """Write ``model.py`` and a state dict of ``cls`` (seeded) into ``folder``; the spec."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(code)
    ns: dict = {}
    exec(compile(code, str(folder / "model.py"), "exec"), ns)  # the test's own code
    torch.manual_seed(0)
    model = ns[cls](**(build_kwargs or (sidecar or {}).get("kwargs", {})))
    torch.save(model.state_dict(), folder / "weights.pt")
    if sidecar is not None:
        (folder / "model.json").write_text(json.dumps(sidecar))
    if classes is not None:
        (folder / "classes.txt").write_text("\n".join(classes))
    return f"python:{folder / 'model.py'}:{cls}:{folder / 'weights.pt'}"


# --------------------------------------------------------------------------------------------
# specs


def test_specs_parse_and_print_back(tmp_path):
    assert "demo-seg" in KNOWN_SPECS and any(s.startswith("python:") for s in KNOWN_SPECS)
    for spec in ("demo-seg", "torchvision-seg:fcn_resnet50", "torchvision-seg:fcn_resnet50:random",
                 "torchvision-seg:deeplabv3_resnet101:/w/sd.pt",
                 "python:/a/b/model.py:UNet:/a/w:1.pt"):
        assert str(parse_spec(spec)) == spec
    p = parse_spec("python:/a/b/model.py:UNet:/a/w:1.pt")  # a colon in the weights path
    assert (p.kind, p.path, p.arch, p.weights) == ("python", "/a/b/model.py", "UNet", "/a/w:1.pt")
    with pytest.raises(ExplorerError, match="segmentation architecture"):
        parse_spec("torchvision-seg:resnet50")
    with pytest.raises(ExplorerError, match="ClassName:weights.pt"):
        parse_spec("python:model.py:weights.pt")
    assert code_file("demo-seg") is None
    assert code_file(f"python:{tmp_path}/m.py:M:w.pt") == str((tmp_path / "m.py").resolve())
    assert 0 < SEG_SHARE_THRESHOLD < 0.5


def test_demo_seg_spec():
    from demo_world import world

    lm = load_model("demo-seg", "cpu")
    assert lm.task == "segmentation" and lm.num_classes == 11
    assert lm.class_names[lm.background_class] == "background" and lm.background_class == 10
    assert lm.recommended_layer == "layer4.relu_out" and lm.input_size == 96
    assert lm.layer_info("layer4.relu_out").shape == (192, 6, 6)
    img, _ = world.render(3, __import__("numpy").random.default_rng(0))
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    out = lm.logits(x)
    assert out.shape == (1, 11, 96, 96)
    shares = lm.class_scores(x)[0]
    assert abs(float(shares.sum()) - 1) < 1e-5
    assert int(lm.summarize(out).pred[0]) == 3  # the image's class, not background


@pytest.mark.parametrize("arch", SEG_ARCHS)
def test_torchvision_seg_random_weights(arch):
    lm = load_model(f"torchvision-seg:{arch}:random", "cpu")
    assert lm.task == "segmentation" and lm.num_classes == 21
    assert lm.class_names[0] == "__background__" and lm.background_class == 0
    lm.input_size = lm.resize = 64  # small and fast; the model is fully convolutional
    lm._layers = None
    out = lm.logits(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 21, 64, 64)  # the dict's "out", upsampled to the input
    info = lm.layer_info(lm.recommended_layer)
    assert info.nonnegative and info.shape[1] > 1, info


def test_torchvision_seg_state_dict_with_aux_head_and_sidecar(tmp_path):
    import torchvision

    torch.manual_seed(0)
    src = torchvision.models.get_model("lraspp_mobilenet_v3_large", weights=None,
                                       weights_backbone=None, num_classes=3)
    torch.save(src.state_dict(), tmp_path / "sd.pt")
    (tmp_path / "classes.txt").write_text("sky\nBackground\ntree\n")
    (tmp_path / "model.json").write_text(json.dumps({"input_size": 64, "layer": "classifier.cbr"}))
    lm = load_model(f"torchvision-seg:lraspp_mobilenet_v3_large:{tmp_path / 'sd.pt'}", "cpu")
    assert lm.class_names == ["sky", "Background", "tree"] and lm.background_class == 1
    assert lm.input_size == lm.resize == 64
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(lm.logits(x), src.eval()(lm.normalize(x))["out"])
    # a state dict with torchvision's auxiliary head loads; the head is dropped
    aux = torchvision.models.get_model("deeplabv3_mobilenet_v3_large", weights=None,
                                       weights_backbone=None, num_classes=2, aux_loss=True)
    torch.save(aux.state_dict(), tmp_path / "aux.pt")
    (tmp_path / "model.json").write_text(json.dumps({"bogus": 1}))
    with pytest.raises(ExplorerError, match="unknown: bogus"):
        load_model(f"torchvision-seg:deeplabv3_mobilenet_v3_large:{tmp_path / 'aux.pt'}", "cpu")
    (tmp_path / "model.json").unlink()
    (tmp_path / "classes.txt").unlink()
    lm = load_model(f"torchvision-seg:deeplabv3_mobilenet_v3_large:{tmp_path / 'aux.pt'}", "cpu")
    assert lm.num_classes == 2 and lm.model.aux_classifier is None
    assert lm.background_class is None  # class_0, class_1: nothing says which is background


# --------------------------------------------------------------------------------------------
# the user's own model code


def test_user_classifier_loads_with_sidecar(tmp_path):
    spec = user_model(tmp_path / "cls", "TinyClassifier",
                      {"kwargs": {"classes": 5, "width": 6}, "input_size": 48,
                       "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
                      classes=list("abcde"))
    lm = load_model(spec, "cpu", allow_code=True)
    assert lm.task == "classification" and lm.class_names == list("abcde")
    assert lm.background_class is None
    assert (lm.input_size, lm.resize, lm.mean) == (48, 48, (0.5, 0.5, 0.5))
    assert lm.logits(torch.rand(3, 3, 48, 48)).shape == (3, 5)
    assert lm.recommended_layer == "relu2"  # the last non-negative spatial layer
    assert str(parse_spec(lm.spec)) == spec


def test_user_unet_loads_as_segmentation(tmp_path):
    spec = user_model(tmp_path / "seg", "TinyUNet", {"input_size": 64},
                      classes=["background", "cell", "stroma", "fat"])
    lm = load_model(spec, "cpu", allow_code=True)
    assert lm.task == "segmentation" and lm.num_classes == 4 and lm.background_class == 0
    assert lm.logits(torch.rand(2, 3, 64, 64)).shape == (2, 4, 64, 64)
    # default layer of a segmenter: the coarsest non-negative layer (the bottleneck), not the
    # decoder's last ReLU
    assert lm.recommended_layer.startswith("bottleneck"), lm.recommended_layer
    dict_spec = user_model(tmp_path / "dict", "DictOut", {"input_size": 64})
    lm = load_model(dict_spec, "cpu", allow_code=True)
    assert lm.task == "segmentation" and lm.logits(torch.rand(1, 3, 64, 64)).shape == (1, 4, 64, 64)


def test_user_code_errors_are_one_clear_message(tmp_path):
    spec = user_model(tmp_path / "a", "TinyClassifier")
    model_py, weights = spec.split(":")[1], spec.split(":")[3]
    with pytest.raises(ExplorerError, match="no torch.nn.Module class 'Nope'.*TinyClassifier"):
        load_model(f"python:{model_py}:Nope:{weights}", "cpu", allow_code=True)
    with pytest.raises(ExplorerError, match="NeedsArgs\\(\\) without arguments failed.*kwargs"):
        load_model(f"python:{model_py}:NeedsArgs:{weights}", "cpu", allow_code=True)
    with pytest.raises(ExplorerError, match="do not fit"):
        load_model(f"python:{model_py}:TinyUNet:{weights}", "cpu", allow_code=True)
    bad = user_model(tmp_path / "b", "TinyClassifier")
    with open(tmp_path / "b" / "model.py", "a") as fh:
        fh.write("\nraise RuntimeError('boom at import')\n")
    with pytest.raises(ExplorerError, match="Importing .* failed: RuntimeError: boom at import"):
        load_model(bad, "cpu", allow_code=True)
    with pytest.raises(ExplorerError, match=r"returns \(1, 224, 224\).*needs logits"):
        load_model(user_model(tmp_path / "c", "Maps"), "cpu", allow_code=True)


def test_user_code_runs_only_where_allowed(tmp_path):
    marker = tmp_path / "RAN"
    code = USER_MODELS + f"\nopen({str(marker)!r}, 'a').write('x')\n"
    spec = user_model(tmp_path / "m", "TinyClassifier", code=code)
    marker.unlink()  # written by user_model's own exec
    forget_shared_models()
    with pytest.raises(UserCodeRefused) as err:
        load_model(spec, "cpu")
    msg = str(err.value)
    assert "runs the Python code in" in msg and "model.py" in msg and "I trust" in msg
    assert "allow_code=True" in msg
    with pytest.raises(UserCodeRefused):
        shared_model(spec, "cpu")
    assert not marker.exists()  # refused before importing anything
    with user_code_allowed([str(tmp_path / "other.py")]):  # another file's trust does not count
        with pytest.raises(UserCodeRefused):
            shared_model(spec, "cpu")
    with user_code_allowed([str(tmp_path / "m" / "model.py")]):
        lm = shared_model(spec, "cpu")
    assert marker.read_text() == "x"
    # the process holds it now, yet an unallowed caller still gets the refusal
    with pytest.raises(UserCodeRefused):
        shared_model(spec, "cpu")
    with user_code_allowed():
        assert shared_model(spec, "cpu") is lm  # the CLI's blanket permission
    assert shared_model(spec, "cpu", allow_code=True) is lm

    # trust set in one thread (one browser session's page run) never leaks into another
    seen: dict[str, object] = {}

    def trusted() -> None:
        set_code_trust([str(tmp_path / "m" / "model.py")])
        seen["a"] = shared_model(spec, "cpu")

    def other() -> None:
        try:
            shared_model(spec, "cpu")
            seen["b"] = "loaded"
        except UserCodeRefused:
            seen["b"] = "refused"

    for fn in (trusted, other):
        t = threading.Thread(target=fn)
        t.start()
        t.join()
    assert seen == {"a": lm, "b": "refused"}
    forget_shared_models()


def test_user_code_helpers_read_no_code_for_other_specs(tmp_path):
    # other kinds need no permission; missing or unreadable files are one clear message
    assert load_model("demo", "cpu").task == "classification"
    with pytest.raises(ExplorerError, match="Model file .* not found"):
        load_model(f"python:{tmp_path / 'missing.py'}:M:{tmp_path / 'w.pt'}", "cpu",
                   allow_code=True)
    (tmp_path / "w.pt").write_bytes(b"")
    (tmp_path / "m.py").write_text("")
    with pytest.raises(ExplorerError, match="Cannot read weights"):
        load_model(f"python:{tmp_path / 'm.py'}:M:{tmp_path / 'w.pt'}", "cpu", allow_code=True)
