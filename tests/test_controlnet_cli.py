"""``sdxl-trt build --controlnet`` and ``sdxl-trt run --controlnet NAME --control-image ...`` (in-process ``main``).

``run`` with two ControlNets must write the same image as ``Pipeline.generate`` of the same request (the runtime's
tests compare that against diffusers); each ``--control-*`` flag belongs to the ``--controlnet`` before it, and
flags out of order, a unit without an image or an unreadable image are exit code 2 with a message naming the flag.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_controlnet_serve import edges_image, photo
from test_pipeline import assert_close

from sdxl_trt.cli import build_parser, main
from sdxl_trt.request import ControlNetUnit, GenerationRequest

RUN = ["run", "--engines", "unused", "--prompt", "p", "--out", "unused.png"]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("control-images")
    edges, depth = folder / "e.png", folder / "d.png"
    edges_image().save(edges)
    photo().save(depth)
    return edges, depth


def test_each_control_flag_belongs_to_the_controlnet_before_it(images: tuple[Path, Path]) -> None:
    e, d = images
    args = build_parser().parse_args([*RUN, "--controlnet", "edges", "--control-image", str(e), "--control-scale", "0.6",
                                      "--controlnet", "depth", "--control-image", str(d), "--control-start", "0.2",
                                      "--control-end", "0.9", "--control-guess-mode"])
    assert args.controlnet == [{"name": "edges", "image": str(e), "scale": 0.6},
                               {"name": "depth", "image": str(d), "start": 0.2, "end": 0.9, "guess_mode": True}]
    assert not hasattr(args, "control_scale")  # every value lives in its unit


@pytest.mark.parametrize("argv,words", [
    (["--control-scale", "0.5", "--controlnet", "edges"], "--control-scale 0.5 must follow the --controlnet"),
    (["--control-guess-mode"], "--control-guess-mode must follow the --controlnet"),
    (["--controlnet", "edges", "--control-scale", "0.5", "--control-scale", "0.7"], "already has --control-scale"),
    (["--controlnet", "edges", "--control-preprocess", "depth"], "invalid choice"),
])
def test_flag_order_errors_exit_2(argv: list[str], words: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*RUN, *argv])
    assert exc.value.code == 2
    assert words in capsys.readouterr().err


def test_missing_or_unreadable_control_image_exit_2(images: tuple[Path, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    e, _ = images
    assert main([*RUN, "--controlnet", "edges", "--control-image", str(e), "--controlnet", "depth"]) == 2
    assert "--controlnet depth has no --control-image" in capsys.readouterr().err
    assert main([*RUN, "--controlnet", "edges", "--control-image", str(tmp_path / "nope.png")]) == 2
    assert "no such file" in capsys.readouterr().err
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png")
    assert main([*RUN, "--controlnet", "edges", "--control-image", str(junk)]) == 2
    assert "is not a readable image" in capsys.readouterr().err


def test_build_passes_controlnets_and_records_them(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``--controlnet PATH[:NAME]`` (repeatable) reaches BuildOptions.controlnets in order."""
    import sdxl_trt.engine.build as build

    seen = {}

    class Stop(Exception):
        pass

    def fake_build(opts: object) -> None:
        seen["opts"] = opts
        raise Stop

    monkeypatch.setattr(build, "build_engines", fake_build)
    with pytest.raises(Stop):
        main(["build", "--model", "tiny", "--out", str(tmp_path / "e"), "--backend", "onnxruntime",
              "--controlnet", "tiny-controlnet:edges", "--controlnet", "some/dir"])
    assert seen["opts"].controlnets == ("tiny-controlnet:edges", "some/dir")


def test_run_two_controlnets_writes_the_pipeline_image(tiny_controlnet_engines: Path, images: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    from sdxl_trt.runtime.pipeline import Pipeline

    e, d = images
    out = tmp_path / "out.png"
    assert main(["-q", "run", "--engines", str(tiny_controlnet_engines), "--prompt", "a lighthouse", "--width", "256",
                 "--height", "256", "--steps", "3", "--seed", "4", "--scheduler", "euler",
                 "--controlnet", "edges", "--control-image", str(e), "--control-scale", "0.6",
                 "--controlnet", "depth", "--control-image", str(d), "--control-start", "0.2",
                 "--control-preprocess", "canny", "--out", str(out)]) == 0
    from sdxl_trt.control_images import canny

    with Image.open(d) as im:
        depth = canny(im.convert("RGB"))
    pipe = Pipeline.load(tiny_controlnet_engines, device="cpu")
    want = pipe.generate(GenerationRequest(
        prompt="a lighthouse", width=256, height=256, steps=3, seed=4, scheduler="euler",
        controlnets=(ControlNetUnit("edges", Image.open(e).convert("RGB"), scale=0.6),
                     ControlNetUnit("depth", depth, start=0.2)))).images[0]
    with Image.open(out) as got:
        assert_close([got.convert("RGB")], [want])
        recorded = json.loads(got.info["parameters"])["controlnets"]
    assert [(c["name"], c["scale"], c["start"]) for c in recorded] == [("edges", 0.6, 0.0), ("depth", 1.0, 0.2)]
    plain = np.asarray(pipe.generate(GenerationRequest(prompt="a lighthouse", width=256, height=256, steps=3,
                                                       seed=4)).images[0])
    assert np.abs(np.asarray(want).astype(int) - plain.astype(int)).max() > 2
