"""Tiny ONNX models with the real insightface signatures, and the synthetic faces they detect.

No weights can be downloaded on CI machines, so tests and the benchmark generate small models that
exercise the production loading code unchanged (manifest → sha256 → signature → routing → session):

- detector  `input.1` 1x3x160x160 → 9 outputs (score/bbox/kps for strides 8, 16, 32, 2 anchors), as
  SCRFD. It scores each anchor by how much of a window around it has the synthetic skin colour
  (`SKIN_RGB`); stride 8 is the active head, 16 and 32 are biased off. Boxes and the five landmarks
  are fixed offsets from the anchor, matching the face `draw_synthetic_face` paints.
- recognizer `input.1` 1x3x112x112 → 1x512: 8x8 colour pooling then a fixed orthonormal projection,
  so different faces get different embeddings and similar faces similar ones.
- swapper `target` 1x3x128x128 + `source` 1x512 → 1x3x128x128 with the 512x512 emap as the LAST
  initializer (inswapper layout). It decodes the latent back to an 8x8 colour layout (the pseudo-
  inverse of the recognizer) and paints it over the aligned face, so the swapped face really moves
  towards the source identity and ID similarity is meaningful.
- enhancer `input` 1x3x512x512 → same shape (GFPGAN layout, [-1, 1]): a mild sharpening filter.

`compute_layers` > 0 adds a convolution trunk to the detector and swapper (a stride-2 stem, then that
many 3x3 conv+ReLU layers, `HEAVY_CHANNELS` wide) whose pooled output enters the result scaled by
`HEAVY_WEIGHT`, so it must be computed but changes no decision. It gives benchmarks a realistic
model/overhead balance with the same signatures: each layer costs about 3 ms (detector, per frame) and
1.6 ms (swapper, per face) on one CPU core.

Random parts come from `numpy.random.default_rng(seed)`, so the same seed gives byte-identical files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from facefleet.agent.models.verify import file_sha256

OPSET = 17
IR_VERSION = 9
DETECTOR_SIZE = 160
SKIN_RGB = (220.0, 170.0, 130.0)
SKIN_TOLERANCE = 1.0  # L1 distance in detector blob units ((x - 127.5) / 128) still counted as skin
STRIDES = (8, 16, 32)
# Face geometry in pixels at scale 1.0: half box size, five landmarks (eyes, nose, mouth corners).
FACE_HALF_W = 22.0
FACE_HALF_H = 28.0
FACE_LANDMARKS = ((-9.0, -7.0), (9.0, -7.0), (0.0, 3.0), (-7.5, 13.0), (7.5, 13.0))


def _model(
    nodes: list[onnx.NodeProto],
    name: str,
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto],
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="facefleet-tiny")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def _const(name: str, value: object) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _ints(name: str, value: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.int64), name)


HEAVY_CHANNELS = 48
HEAVY_WEIGHT = 1e-6


def _compute_trunk(
    input_name: str, output_name: str, layers: int, seed: int, prefix: str
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Conv trunk on `input_name` (N x 3 x H x W) reduced to a scalar `output_name` ~ HEAVY_WEIGHT * mean."""
    rng = np.random.default_rng(seed)
    channels = HEAVY_CHANNELS
    inits = [
        _const(f"{prefix}_stem_w", rng.standard_normal((channels, 3, 3, 3)) * (2.0 / 27) ** 0.5),
        _const(f"{prefix}_weight", np.float32(HEAVY_WEIGHT)),
    ]
    nodes = [
        helper.make_node("Conv", [input_name, f"{prefix}_stem_w"], [f"{prefix}_x0"], pads=[1, 1, 1, 1], strides=[2, 2])
    ]
    for index in range(layers):
        weight = rng.standard_normal((channels, channels, 3, 3)) * (2.0 / (9 * channels)) ** 0.5
        inits.append(_const(f"{prefix}_w{index}", weight))
        nodes += [
            helper.make_node(
                "Conv", [f"{prefix}_x{index}", f"{prefix}_w{index}"], [f"{prefix}_c{index}"], pads=[1] * 4
            ),
            helper.make_node("Relu", [f"{prefix}_c{index}"], [f"{prefix}_x{index + 1}"]),
        ]
    nodes += [
        helper.make_node("ReduceMean", [f"{prefix}_x{layers}"], [f"{prefix}_mean"], keepdims=0),
        helper.make_node("Mul", [f"{prefix}_mean", f"{prefix}_weight"], [output_name]),
    ]
    return nodes, inits


def build_detector(compute_layers: int = 0) -> onnx.ModelProto:
    size = DETECTOR_SIZE
    skin = (np.asarray(SKIN_RGB, dtype=np.float32) - 127.5) / 128.0
    inits = [
        _const("skin_ref", skin.reshape(1, 3, 1, 1)),
        _const("inv_tolerance", np.float32(1.0 / SKIN_TOLERANCE)),
        _const("one", np.float32(1.0)),
        _const("zero", np.float32(0.0)),
        _ints("channel_axis", [1]),
        _ints("column", [-1, 1]),
    ]
    nodes = [
        helper.make_node("Sub", ["input.1", "skin_ref"], ["skin_diff"]),
        helper.make_node("Abs", ["skin_diff"], ["skin_abs"]),
        helper.make_node("ReduceSum", ["skin_abs", "channel_axis"], ["skin_dist"], keepdims=1),
        helper.make_node("Mul", ["skin_dist", "inv_tolerance"], ["skin_scaled"]),
        helper.make_node("Sub", ["one", "skin_scaled"], ["skin_lin"]),
    ]
    if compute_layers > 0:
        trunk_nodes, trunk_inits = _compute_trunk("input.1", "trunk_bias", compute_layers, 101, "det")
        nodes += [*trunk_nodes, helper.make_node("Add", ["skin_lin", "trunk_bias"], ["skin_pre"])]
        inits += trunk_inits
    nodes.append(helper.make_node("Relu", ["skin_pre" if compute_layers > 0 else "skin_lin"], ["skin"]))
    score_names, bbox_names, kps_names = [], [], []
    for stride in STRIDES:
        window = {8: 40, 16: 32, 32: 64}[stride]
        gain, bias = (24.0, -16.0) if stride == 8 else (1.0, -40.0)
        half = window // 2
        nodes += [
            helper.make_node(
                "AveragePool",
                ["skin"],
                [f"pool_{stride}"],
                kernel_shape=[window, window],
                strides=[stride, stride],
                pads=[half, half, half - stride, half - stride],
            ),
            helper.make_node("Mul", [f"pool_{stride}", f"gain_{stride}"], [f"scaled_{stride}"]),
            helper.make_node("Add", [f"scaled_{stride}", f"bias_{stride}"], [f"logit_{stride}"]),
            helper.make_node("Sigmoid", [f"logit_{stride}"], [f"prob_{stride}"]),
            helper.make_node("Reshape", [f"prob_{stride}", "column"], [f"loc_{stride}"]),
            helper.make_node("Concat", [f"loc_{stride}", f"loc_{stride}"], [f"anchors_{stride}"], axis=1),
            helper.make_node("Reshape", [f"anchors_{stride}", "column"], [f"score_{stride}"]),
            helper.make_node("Mul", [f"score_{stride}", "zero"], [f"zeros_{stride}"]),
            helper.make_node("Add", [f"zeros_{stride}", f"box_offsets_{stride}"], [f"bbox_{stride}"]),
            helper.make_node("Add", [f"zeros_{stride}", f"kps_offsets_{stride}"], [f"kps_{stride}"]),
        ]
        box = np.asarray([FACE_HALF_W, FACE_HALF_H, FACE_HALF_W, FACE_HALF_H]) / stride
        kps = np.asarray(FACE_LANDMARKS).reshape(-1) / stride
        inits += [
            _const(f"gain_{stride}", np.float32(gain)),
            _const(f"bias_{stride}", np.float32(bias)),
            _const(f"box_offsets_{stride}", box.reshape(1, 4)),
            _const(f"kps_offsets_{stride}", kps.reshape(1, 10)),
        ]
        score_names.append(f"score_{stride}")
        bbox_names.append(f"bbox_{stride}")
        kps_names.append(f"kps_{stride}")
    outputs = []
    for stride, s_name, b_name, k_name in zip(STRIDES, score_names, bbox_names, kps_names, strict=True):
        anchors = (size // stride) ** 2 * 2
        outputs.append((s_name, [anchors, 1]))
        outputs.append((b_name, [anchors, 4]))
        outputs.append((k_name, [anchors, 10]))
    ordered = [o for o in outputs if o[0].startswith("score")] + [o for o in outputs if o[0].startswith("bbox")]
    ordered += [o for o in outputs if o[0].startswith("kps")]
    return _model(
        nodes,
        "tiny_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in ordered],
        inits,
    )


def _orthonormal(rng: np.random.Generator, n: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


# The 8x8 pooled cells an identity is read from: the face interior of an ArcFace crop (rows 2-6,
# columns 2-5 of 14-pixel cells), so the background around a face does not count, as in a real model.
IDENTITY_ROWS = slice(2, 7)
IDENTITY_COLS = slice(2, 6)


def identity_cells() -> np.ndarray:
    weights = np.zeros((1, 3, 8, 8), np.float32)
    weights[..., IDENTITY_ROWS, IDENTITY_COLS] = 1.0
    return weights


def skin_offset() -> np.ndarray:
    """Average skin in ArcFace blob units on the identity cells: identity is the deviation from it."""
    skin = (np.asarray(SKIN_RGB, np.float32) - 127.5) / 127.5
    return (identity_cells() * skin.reshape(1, 3, 1, 1)).reshape(1, 192)


def recognizer_projection(seed: int) -> np.ndarray:
    """192x512 projection with orthonormal rows (8x8x3 pooled colours → embedding)."""
    return _orthonormal(np.random.default_rng(seed), 512)[:192]


def build_recognizer(seed: int) -> onnx.ModelProto:
    nodes = [
        helper.make_node("AveragePool", ["input.1"], ["pooled"], kernel_shape=[14, 14], strides=[14, 14]),
        helper.make_node("Mul", ["pooled", "identity_cells"], ["face_cells"]),
        helper.make_node("Flatten", ["face_cells"], ["cell_colours"], axis=1),
        helper.make_node("Sub", ["cell_colours", "skin_offset"], ["features"]),
        helper.make_node("Gemm", ["features", "projection"], ["embedding"]),
    ]
    return _model(
        nodes,
        "tiny_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 512])],
        [
            _const("identity_cells", identity_cells()),
            _const("skin_offset", skin_offset()),
            _const("projection", recognizer_projection(seed)),
        ],
    )


def _reference_feature_norm() -> float:
    """|pooled features| of the synthetic face in an ArcFace crop: restores scale lost to latent norm."""
    canvas = np.full((112, 112, 3), 127, np.uint8)
    draw_synthetic_face(canvas, (56.0, 62.0), 112 / 70.0)
    blob = (cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB).astype(np.float32) - 127.5) / 127.5
    pooled = blob.reshape(8, 14, 8, 14, 3).mean(axis=(1, 3)).transpose(2, 0, 1)[None]
    features = (pooled * identity_cells()).reshape(1, 192) - skin_offset()
    return float(np.linalg.norm(features))


def build_swapper(seed: int, compute_layers: int = 0) -> onnx.ModelProto:
    projection = recognizer_projection(seed)
    decoder = (np.linalg.pinv(projection) * _reference_feature_norm()).astype(np.float32)  # 512x192
    emap = _orthonormal(np.random.default_rng(seed + 1), 512)
    face_mask = np.zeros((1, 1, 128, 128), np.float32)
    rows, cols = IDENTITY_ROWS, IDENTITY_COLS  # paint only the cells identity is read from
    face_mask[..., rows.start * 14 : rows.stop * 14, 8 + cols.start * 14 : 8 + cols.stop * 14] = 0.75
    nodes = [
        helper.make_node("Gemm", ["source", "emap"], ["identity"], transB=1),  # latent @ emap^T
        helper.make_node("MatMul", ["identity", "decoder"], ["deviation"]),
        helper.make_node("Add", ["deviation", "skin_offset"], ["layout"]),
        helper.make_node("Reshape", ["layout", "layout_shape"], ["layout_8x8"]),
        helper.make_node("Resize", ["layout_8x8", "", "upscale"], ["layout_112"], mode="nearest"),
        helper.make_node("Pad", ["layout_112", "crop_pads"], ["layout_128"]),
        helper.make_node("Mul", ["layout_128", "half"], ["layout_half"]),
        helper.make_node("Add", ["layout_half", "half"], ["painted"]),
        helper.make_node("Sub", ["painted", "target"], ["delta"]),
        helper.make_node("Mul", ["delta", "face_mask"], ["masked_delta"]),
        helper.make_node("Add", ["target", "masked_delta"], ["mixed"]),
    ]
    trunk_inits: list[onnx.TensorProto] = []
    if compute_layers > 0:
        trunk_nodes, trunk_inits = _compute_trunk("target", "trunk_bias", compute_layers, seed + 2, "swap")
        nodes += [*trunk_nodes, helper.make_node("Add", ["mixed", "trunk_bias"], ["mixed_trunk"])]
    nodes.append(
        helper.make_node("Clip", ["mixed_trunk" if compute_layers > 0 else "mixed", "zero", "one"], ["output"])
    )
    inits = [
        *trunk_inits,
        _const("decoder", decoder),
        _const("skin_offset", skin_offset()),
        _ints("layout_shape", [1, 3, 8, 8]),
        _const("upscale", np.asarray([1, 1, 14, 14])),
        _ints("crop_pads", [0, 0, 0, 8, 0, 0, 16, 8]),
        _const("half", np.float32(0.5)),
        _const("face_mask", face_mask),
        _const("zero", np.float32(0.0)),
        _const("one", np.float32(1.0)),
        _const("emap", emap),  # last initializer, as in inswapper_128.onnx
    ]
    return _model(
        nodes,
        "tiny_inswapper",
        [
            helper.make_tensor_value_info("target", TensorProto.FLOAT, [1, 3, 128, 128]),
            helper.make_tensor_value_info("source", TensorProto.FLOAT, [1, 512]),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 128, 128])],
        inits,
    )


def build_enhancer() -> onnx.ModelProto:
    sharpen = np.zeros((3, 1, 3, 3), np.float32)
    sharpen[:, 0] = np.asarray([[0, -0.15, 0], [-0.15, 1.6, -0.15], [0, -0.15, 0]])
    nodes = [
        helper.make_node("Conv", ["input", "sharpen"], ["sharpened"], group=3, pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["sharpened", "low", "high"], ["output"]),
    ]
    return _model(
        nodes,
        "tiny_gfpgan",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 512, 512])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 512, 512])],
        [_const("sharpen", sharpen), _const("low", np.float32(-1.0)), _const("high", np.float32(1.0))],
    )


@dataclass(frozen=True)
class TinyModelSet:
    models_dir: Path
    manifest_path: Path
    files: dict[str, Path]


def _signature_toml(model: onnx.ModelProto) -> tuple[str, str]:
    def tensors(infos: list[onnx.ValueInfoProto]) -> str:
        items = []
        for info in infos:
            dims = [d.dim_value for d in info.type.tensor_type.shape.dim]
            items.append(f'{{ name = "{info.name}", shape = {dims} }}')
        return "[" + ", ".join(items) + "]"

    init_names = {i.name for i in model.graph.initializer}
    return tensors([i for i in model.graph.input if i.name not in init_names]), tensors(list(model.graph.output))


def write_tiny_models(models_dir: Path, seed: int = 0, enhancer: bool = True, compute_layers: int = 0) -> TinyModelSet:
    """Write the tiny models and a matching `manifest.toml` into `models_dir`.

    `compute_layers`: extra conv layers in the detector and swapper (see the module doc); 0 = tiny."""
    models_dir.mkdir(parents=True, exist_ok=True)
    specs: list[tuple[str, str, onnx.ModelProto]] = [
        ("det_tiny", "detector", build_detector(compute_layers)),
        ("arcface_tiny", "recognizer", build_recognizer(seed)),
        ("inswapper_tiny", "swapper", build_swapper(seed, compute_layers)),
    ]
    if enhancer:
        specs.append(("gfpgan_tiny", "enhancer", build_enhancer()))
    lines = ["# Generated by agent.models.tiny.write_tiny_models: tiny test models, not for production.", ""]
    files: dict[str, Path] = {}
    for name, role, model in specs:
        path = models_dir / f"{name}.onnx"
        onnx.save(model, str(path))
        files[name] = path
        inputs, outputs = _signature_toml(model)
        lines += [
            "[[model]]",
            f'name = "{name}"',
            f'role = "{role}"',
            f'file = "{path.name}"',
            f'sha256 = "{file_sha256(path)}"',
            f"inputs = {inputs}",
            f"outputs = {outputs}",
            "",
        ]
    manifest_path = models_dir / "manifest.toml"
    manifest_path.write_text("\n".join(lines), encoding="utf-8")
    return TinyModelSet(models_dir=models_dir, manifest_path=manifest_path, files=files)


def draw_synthetic_face(
    image: np.ndarray,
    center: tuple[float, float],
    scale: float = 1.0,
    skin_rgb: tuple[float, float, float] = SKIN_RGB,
    eye_rgb: tuple[int, int, int] = (40, 30, 30),
    mouth_rgb: tuple[int, int, int] = (120, 40, 40),
) -> tuple[int, int, int, int]:
    """Paint (in place, BGR) the face the tiny detector finds; returns its box (x1, y1, x2, y2)."""
    cx, cy = center

    def bgr(rgb: tuple[float, ...]) -> tuple[int, int, int]:
        return int(rgb[2]), int(rgb[1]), int(rgb[0])

    def at(dx: float, dy: float) -> tuple[int, int]:
        return round(cx + dx * scale), round(cy + dy * scale)

    axes = (round(FACE_HALF_W * scale), round(FACE_HALF_H * scale))
    cv2.ellipse(image, at(0, 0), axes, 0, 0, 360, bgr(skin_rgb), -1, cv2.LINE_AA)
    for dx, dy in FACE_LANDMARKS[:2]:
        cv2.circle(image, at(dx, dy), max(1, round(3 * scale)), bgr(eye_rgb), -1, cv2.LINE_AA)
    cv2.line(image, at(*FACE_LANDMARKS[3]), at(*FACE_LANDMARKS[4]), bgr(mouth_rgb), max(1, round(2 * scale)))
    return (
        round(cx - FACE_HALF_W * scale),
        round(cy - FACE_HALF_H * scale),
        round(cx + FACE_HALF_W * scale),
        round(cy + FACE_HALF_H * scale),
    )
