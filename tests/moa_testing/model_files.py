"""Small random-weight model files that ComfyUI's and insightface's own loaders accept.

Nothing is downloaded and nothing is committed: the tests write these files into temp folders
(see moa_testing/fixtures.py, which makes each of them once per test session). comfy is imported
inside the functions: tests/conftest.py puts the host on sys.path and forces the CPU first.

Time to write each file on the 2-core test machine (CPU, torch 2.14, machine otherwise quiet; two to
three times as long while other test runs share the cores), and its size:
    write_sd15_checkpoint    1.5 s   303 MB  (UNet 26 M + CLIP-L 123 M + TAESD 2.4 M params, fp16);
                                             load 0.4 s, 2 steps at 256 px 2.5 s, TAESD decode 0.3 s
    write_sdxl_checkpoint     25 s   2.2 GB  (UNet 283 M + CLIP-L 123 M + bigG 695 M + TAESD, fp16); load
                                             and 4 runs of 2 steps at 128 px, MoA on 140 layers: 22 s, 5.8 GB RSS
    write_sd15_controlnet    0.1 s    31 MB  (fp16); 2 steps at 128 px with it 0.4 s
    write_clip_vision_vitl   2.3 s   608 MB  (ViT-L/14, 303 M params, fp16); load 0.2 s, one
                                             encode_image 2.5-4 s
    write_insightface_pack   0.3 s   0.7 MB  (two ONNX files); FaceAnalysis.get 0.1 s per 512 px image
    write_moa_weights        0.1 s    29 MB  (for the small SD15, fp32)
The whole of tests/host/test_model_files.py: 16 s (50 s with other test runs beside it).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moa_testing.tiny import TINY_SD15, TINY_SDXL, moa_weights_for

SMALL_SD15_UNET = {
    **TINY_SD15,
    "model_channels": 320,  # SD15's detection matches on 320 channels; one level keeps it small
    "num_res_blocks": [1],
    "channel_mult": [1],
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
}
"""The UNet of write_sd15_checkpoint: attention at input 1, middle 0, output 0 and 1 (8 attention layers)."""

_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)


def init_weights_(module: nn.Module, seed: int, std: float = 0.02) -> nn.Module:
    """Norm weights 1, norm and other biases 0, every other parameter N(0, std), from a generator seeded
    with `seed` (ComfyUI builds its modules uninitialised). Returns `module`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for owner in module.modules():
            for name, p in owner.named_parameters(recurse=False):
                if isinstance(owner, _NORMS):
                    p.fill_(1.0 if name == "weight" else 0.0)
                elif name == "bias":
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=generator) * std)
    return module


def _save_fp16(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, str(path))
    return path


def write_sd15_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """A checkpoint that `comfy.sd.load_checkpoint_guess_config` (CheckpointLoaderSimple) detects as SD15 (EPS).

    The UNet is SMALL_SD15_UNET (320 channels, one level, one res block: 26 M params), the text encoder
    the full random CLIP-L of sd1_clip_config.json, the VAE TAESD (`first_stage_model.taesd_*`,
    `vae_scale`, `vae_shift`). Key names come from ComfyUI's own `state_dict_for_saving`; fp16.
    Keep images at 256 px or less (512 px costs 7-9 s a step on the CPU)."""
    import comfy.supported_models

    return _write_checkpoint(comfy.supported_models.SD15(dict(SMALL_SD15_UNET)), path, seed)


SMALL_SDXL_UNET = {
    **TINY_SDXL,
    "model_channels": 320,  # SDXL's detection matches on 320 channels and transformer_depth [0, 0, 2, 2, 10, 10] ...
    "num_res_blocks": [2, 2, 2],
    "channel_mult": [1, 1, 1],  # ... but not on the widths of its levels: all three stay at 320
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "transformer_depth_middle": 10,
}
"""The UNet of write_sdxl_checkpoint: SDXL's full attention layout (70 transformer blocks, 140 MoA layers),
320 channels on every level where SDXL widens to 640 and 1280."""


def write_sdxl_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """A checkpoint that `comfy.sd.load_checkpoint_guess_config` (CheckpointLoaderSimple) detects as SDXL (EPS).

    The UNet is SMALL_SDXL_UNET, the text encoders SDXL's full random CLIP-L and OpenCLIP-bigG (their
    configs are fixed, so they are most of the file), the VAE TAESD; fp16, as write_sd15_checkpoint."""
    import comfy.supported_models

    return _write_checkpoint(comfy.supported_models.SDXL(dict(SMALL_SDXL_UNET)), path, seed)


def _write_checkpoint(config, path: str | Path, seed: int) -> Path:
    """The model of `config` (a supported_models class built on its UNet config), its text encoders and
    TAESD, random, under the key names of ComfyUI's own `state_dict_for_saving`."""
    import comfy.sd

    config.set_inference_dtype(torch.float32, None)
    model = init_weights_(config.get_model({}), seed)
    clip = comfy.sd.CLIP(config.clip_target(), parameters=0)
    init_weights_(clip.cond_stage_model, seed + 1)
    parts = {"clip_state_dict": clip.get_sd(), "vae_state_dict": _taesd(seed + 2).state_dict()}
    if "unet_state_dict" in inspect.signature(model.state_dict_for_saving).parameters:
        # ComfyUI 0.33 takes the UNet's state dict from its caller (0.3.64 and 0.8 read their own); given
        # the text encoder's in its place, it writes no UNet and the file is not detected as a checkpoint
        parts["unet_state_dict"] = model.diffusion_model.state_dict()
    return _save_fp16(model.state_dict_for_saving(**parts), path)


def _taesd(seed: int) -> nn.Module:
    """TAESD with weights large enough, and a mid-grey output bias, for decoded images that vary instead
    of being black (tests compare pictures); its own latent scale and shift, not random numbers."""
    import comfy.taesd.taesd

    taesd = init_weights_(comfy.taesd.taesd.TAESD(latent_channels=4), seed, std=0.04)
    with torch.no_grad():
        taesd.vae_scale.fill_(1.0)
        taesd.vae_shift.fill_(0.0)
        [*_, last] = (m for m in taesd.taesd_decoder.modules() if isinstance(m, torch.nn.Conv2d))
        last.bias.fill_(0.5)
    return taesd


def write_sd15_controlnet(path: str | Path, unet_config: Mapping | None = None, seed: int = 1) -> Path:
    """A ControlNet file (the layout without "control_model.": `zero_convs.*`, `input_hint_block.*`,
    `middle_block_out.*`, ...) that `comfy.controlnet.load_controlnet` accepts for the model whose UNet
    config is `unet_config`: by default SMALL_SD15_UNET, the one of write_sd15_checkpoint (a loaded
    model's `model.model.model_config.unet_config` works too). Built from `comfy.cldm.cldm.ControlNet`
    for 3-channel hints; fp16. Unlike a fresh ControlNet its zero convs are random too, so a hint
    changes the sampled latent."""
    import comfy.cldm.cldm
    import comfy.supported_models

    if unet_config is None:
        unet_config = comfy.supported_models.SD15(dict(SMALL_SD15_UNET)).unet_config  # adds num_heads etc.
    config = {k: v for k, v in unet_config.items() if k not in ("out_channels", "dtype", "device", "operations")}
    control = comfy.cldm.cldm.ControlNet(hint_channels=3, **config, dtype=torch.float32)
    return _save_fp16(init_weights_(control, seed).state_dict(), path)


def write_clip_vision_vitl(path: str | Path, seed: int = 2) -> Path:
    """A random CLIP ViT-L/14 vision model (24 layers, hidden 1024, projection 768, 224 px) that
    `comfy.clip_vision.load` recognises as ViT-L: keys as ComfyUI's CLIPVisionModelProjection names
    them (`vision_model.*`, `visual_projection.weight`), fp16, 608 MB. Its `encode_image` gives
    `image_embeds` [n, 768]."""
    import comfy.clip_vision

    json_config = Path(comfy.clip_vision.__file__).with_name("clip_vision_config_vitl.json")
    encoder = comfy.clip_vision.ClipVisionModel(str(json_config))
    init_weights_(encoder.model, seed)
    return _save_fp16(encoder.get_sd(), path)


def write_moa_weights(path: str | Path, model_patcher, seed: int | None = None, fuser_std: float = 0.05) -> Path:
    """MoA weights for `model_patcher`'s UNet (an SD1.5 or SDXL ModelPatcher), written with the pack's
    own `save_weights`: "MoA init" (the base model's output) without a seed; with a seed, every part
    random as if trained (moa_testing.tiny.moa_weights_for)."""
    from comfyui_moa.moa_core import save_weights

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(moa_weights_for(model_patcher, seed, fuser_std), path)
    return path


# --- insightface ----------------------------------------------------------------------------------

ARCFACE_TEMPLATE = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)
"""insightface's 112 px alignment template (left eye, right eye, nose, mouth left, mouth right)."""

FACE_KPS_LAYOUT = tuple((x / 112.0, y / 112.0) for x, y in ARCFACE_TEMPLATE)
"""Where the synthetic detector puts the 5 keypoints, as fractions of its box: the template's layout,
so insightface's norm_crop maps the detected box exactly onto the 112 px recognition crop."""

FACE_MIN_LEVEL = 190
"""draw_faces paints faces with every channel in [FACE_MIN_LEVEL, 255] ..."""
BACKGROUND_MAX_LEVEL = 90
"""... on a background with every channel in [0, BACKGROUND_MAX_LEVEL]."""
_THRESHOLD_LEVEL = 150  # the detector's "bright" threshold, between the two (min over channels)
_CELL = 4  # the detector measures runs on 4x4 pixel cells of its input
_STRIDE_SIDES = {8: (16, 96), 16: (96, 192), 32: (192, 100_000)}  # side range (det-input px) each stride reports


class SquareFaceDetector(nn.Module):
    """An SCRFD-shaped detector for draw_faces' "faces": bright squares on a darker background.

    Input [1, 3, H, W] normalised as insightface does ((bgr→rgb − 127.5) / 128), H and W multiples of 32.
    Outputs (non-batched, 2 anchors a location, strides 8/16/32, as SCRFD with keypoints):
    scores [N, 1] ×3, bbox distances [N, 4] ×3, keypoints [N, 10] ×3, in stride units.

    A cell is bright when most of its pixels have every channel above the threshold. At each cell the
    run of bright cells through it gives, along its row, the left and right edge and, along its column,
    the top and bottom edge: for a solid square every cell inside predicts the square's box, to half a
    cell. Only the first anchor of locations within half a stride of that box's centre scores (0.7-0.9),
    and only at the stride whose side range holds the box's side, and only for boxes about square; their
    boxes coincide, so NMS leaves one detection per square.
    """

    def forward(self, x: torch.Tensor):
        threshold = (_THRESHOLD_LEVEL - 127.5) / 128.0
        bright = (torch.amin(x, dim=1, keepdim=True) > threshold).float()
        cells = (nn.functional.avg_pool2d(bright, _CELL) > 0.5).float()  # [1, 1, R, C]
        left, right = self._runs(cells)
        up, down = (t.transpose(2, 3) for t in self._runs(cells.transpose(2, 3)))
        # cell index of every cell, along x and y, without constants baked for one input size
        col = torch.cumsum(torch.ones_like(cells), dim=3) - 1
        row = torch.cumsum(torch.ones_like(cells), dim=2) - 1
        x1, x2 = (col - left + 1) * _CELL, (col + right) * _CELL
        y1, y2 = (row - up + 1) * _CELL, (row + down) * _CELL
        w, h = x2 - x1, y2 - y1
        squarish = (torch.abs(w - h) <= 0.15 * torch.maximum(w, h)).float() * cells
        ax, ay = col * _CELL, row * _CELL  # the anchor centre a cell starts with
        dx, dy = torch.abs((x1 + x2) / 2 - ax), torch.abs((y1 + y2) / 2 - ay)
        side = (w + h) / 2

        scores, boxes, kpss = [], [], []
        for stride, (smallest, largest) in _STRIDE_SIDES.items():
            step = stride // _CELL

            def at_anchors(t, step=step):
                return t[:, :, ::step, ::step]

            s_dx, s_dy, s_side = at_anchors(dx), at_anchors(dy), at_anchors(side)
            fires = (
                at_anchors(squarish)
                * (s_dx <= stride / 2).float()
                * (s_dy <= stride / 2).float()
                * (s_side >= smallest).float()
                * (s_side < largest).float()
            )
            score = fires * (0.9 - 0.2 * (s_dx + s_dy) / stride)
            s_ax, s_ay = at_anchors(ax), at_anchors(ay)
            s_x1, s_y1, s_x2, s_y2 = at_anchors(x1), at_anchors(y1), at_anchors(x2), at_anchors(y2)
            box = torch.cat([s_ax - s_x1, s_ay - s_y1, s_x2 - s_ax, s_y2 - s_ay], dim=1) / stride
            kps = (
                torch.cat(
                    [
                        torch.cat([s_x1 + fx * (s_x2 - s_x1) - s_ax, s_y1 + fy * (s_y2 - s_y1) - s_ay], dim=1)
                        for fx, fy in FACE_KPS_LAYOUT
                    ],
                    dim=1,
                )
                / stride
            )
            scores.append(self._per_anchor(score, second=score * 0))
            boxes.append(self._per_anchor(box, second=box))
            kpss.append(self._per_anchor(kps, second=kps))
        return (*scores, *boxes, *kpss)

    @staticmethod
    def _runs(cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Length of the run of bright cells through each bright cell along the last axis, counted to
        the left (start) and to the right (end), both including the cell; 0 on dark cells."""
        zeros_so_far = torch.cumsum(1 - cells, dim=3)  # runs are stretches of equal zero counts
        index = torch.cumsum(torch.ones_like(cells), dim=3)
        same_run = (zeros_so_far.unsqueeze(-1) == zeros_so_far.unsqueeze(-2)).float()  # [..., i, j]
        before = (index.unsqueeze(-1) >= index.unsqueeze(-2)).float()  # j <= i
        left = (same_run * before * cells.unsqueeze(-2)).sum(-1) * cells
        right = (same_run * (1 - before)).sum(-1) * cells + cells
        return left, right

    @staticmethod
    def _per_anchor(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """[1, C, h, w] for each of the 2 anchors -> [h * w * 2, C] in SCRFD's anchor order."""
        pair = torch.stack([first, second], dim=-1)  # [1, C, h, w, 2]
        return pair.permute(0, 2, 3, 4, 1).reshape(-1, first.shape[1])


class PooledFaceEmbedder(nn.Module):
    """An ArcFace-shaped recognition model: [n, 3, 112, 112] -> [n, 512], a fixed random projection of
    the 8 px average-pooled colours of the crop's central 80 px, minus their mean. The margin keeps the
    background a slightly-off box lets in out of it: same content, same embedding (cosine > 0.95 across
    sizes and places); another texture, another direction (cosine ~0-0.3)."""

    def __init__(self, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        features = 3 * 10 * 10
        self.projection = nn.Linear(features, 512, bias=False)
        with torch.no_grad():
            self.projection.weight.copy_(torch.randn(512, features, generator=generator) / math.sqrt(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.avg_pool2d(x[:, :, 16:96, 16:96], 8).flatten(1)
        return self.projection(pooled - pooled.mean(dim=1, keepdim=True))


def write_insightface_pack(root: str | Path, name: str = "antelopev2", seed: int = 3) -> Path:
    """A synthetic insightface model pack at `root/models/<name>/` (what `FaceAnalysis(name=name, root=root)`
    reads without downloading): `scrfd_10g_bnkps.onnx`, a SquareFaceDetector, and `glintr100.onnx`, a
    PooledFaceEmbedder seeded with `seed`; ONNX opset 17, 0.7 MB together. Returns the pack's folder.
    Faces are what draw_faces draws. The detector takes any det size that is a multiple of 32; at det_size
    640 it finds squares of 24-500 px in a 512 px image, boxes within 6 % of the side (1 % above 200 px)."""
    folder = Path(root) / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    detector_outputs = [f"{kind}_{stride}" for kind in ("score", "bbox", "kps") for stride in _STRIDE_SIDES]
    with warnings.catch_warnings():  # the TorchScript exporter (dynamo=False) is deprecated but kept
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            SquareFaceDetector().eval(),
            (torch.zeros(1, 3, 640, 640),),
            str(folder / "scrfd_10g_bnkps.onnx"),
            input_names=["input_1"],
            output_names=detector_outputs,
            dynamic_axes={"input_1": {2: "height", 3: "width"}, **{o: {0: "anchors"} for o in detector_outputs}},
            opset_version=17,
            dynamo=False,
        )
        torch.onnx.export(
            PooledFaceEmbedder(seed).eval(),
            (torch.zeros(1, 3, 112, 112),),
            str(folder / "glintr100.onnx"),
            input_names=["input_1"],
            output_names=["embedding"],
            dynamic_axes={"input_1": {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return folder


def draw_faces(
    size: int | tuple[int, int], boxes: Sequence[Sequence[int]], seed: int = 0, identities: Sequence[int] | None = None
) -> np.ndarray:
    """An RGB uint8 image [height, width, 3] (size = side or (height, width)) of dark noise with one
    "face" per box (x, y, side): a square whose every channel is at least FACE_MIN_LEVEL, textured with
    a smooth random colour pattern that scales with the square. identities[i] (default: seed, i) picks
    square i's pattern: equal identities give equal content, hence the same embedding.
    Use `image[..., ::-1]` for insightface's BGR, `torch.from_numpy(image / 255)[None]` for a ComfyUI IMAGE."""
    height, width = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    image = rng.integers(0, BACKGROUND_MAX_LEVEL + 1, (height, width, 3), dtype=np.uint8)
    for i, (x, y, side) in enumerate(boxes):
        identity = identities[i] if identities is not None else (seed, i)
        pattern = np.random.default_rng(identity).uniform(FACE_MIN_LEVEL, 255, (1, 3, 4, 4)).astype(np.float32)
        texture = nn.functional.interpolate(torch.from_numpy(pattern), size=(side, side), mode="bilinear")
        image[y : y + side, x : x + side] = texture[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()
    return image
