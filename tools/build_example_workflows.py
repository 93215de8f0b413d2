"""Write example_workflows/*.json (UI format) from the graphs below.

Run from the repo root: `python tools/build_example_workflows.py`. Node inputs, widget order and
defaults come from the nodes themselves (ComfyUI's core nodes and this pack's), so the files always
match the code. Artists open the results from ComfyUI's template browser.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import moa_pack  # noqa: E402

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
CLIP_VISION = "clip-vit-large-patch14.safetensors"
MOA = "moa_sd15.safetensors"
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
SDXL_MOA = "moa_sdxl.safetensors"
CONTROLNET = "control_v11p_sd15_openpose.safetensors"
CLIP_VISION_H = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"  # the encoder of every SD1.5 IP-Adapter
IPADAPTER = "ip-adapter-plus-face_sd15.safetensors"
NEGATIVE = "blurry, lowres, deformed, watermark, text"
SAMPLER = {"seed": 42, "steps": 25, "cfg": 7.0, "sampler_name": "dpmpp_2m", "scheduler": "karras"}
# Columns of the layout, left to right, 360 px apart so that 320 px wide nodes never overlap.
LOADERS, PHOTOS, SUBJECTS, APPLY, SAMPLE, DECODE, SHOW = (360 * i for i in range(7))
ROW = 440  # between subject rows: a LoadImage with its photo is about 400 px tall


def object_info() -> dict:
    moa_pack.use_host(cpu=True)
    return moa_pack.module("moa_runner.local").local_object_info()


class Graph:
    """A UI-format workflow built node by node."""

    def __init__(self, info: dict) -> None:
        self.info, self.nodes, self.links = info, [], []

    def add(self, kind: str, pos: tuple[int, int], title: str | None = None, **widgets) -> dict:
        workflow = moa_pack.module("moa_runner.workflow")
        values, sockets = [], []
        for name, spec_type, options in workflow.input_specs(self.info[kind]):
            if workflow.is_widget(spec_type, options):
                default = spec_type[0] if isinstance(spec_type, list) and spec_type else options.get("default")
                values.append(widgets.pop(name, default))
                if workflow.widget_slots(name, spec_type, options) == 2:
                    values.append("fixed" if spec_type == "INT" else "image")
            else:
                sockets.append({"name": name, "type": spec_type, "link": None})
        if widgets:
            raise ValueError(f"{kind} has no widgets {sorted(widgets)}")
        outputs = self.info[kind]["output"]
        names = self.info[kind]["output_name"]
        node = {
            "id": len(self.nodes) + 1,
            "type": kind,
            "pos": list(pos),
            "size": [320, 60 + 26 * (len(sockets) + len(values))],
            "flags": {},
            "order": len(self.nodes),
            "mode": 0,
            "inputs": sockets,
            "outputs": [
                {"name": n, "type": t, "links": [], "slot_index": i}
                for i, (n, t) in enumerate(zip(names, outputs, strict=True))
            ],
            "properties": {"Node name for S&R": kind},
            "widgets_values": values,
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def connect(self, source: dict, output: str, target: dict, input_name: str) -> None:
        slot = next(i for i, o in enumerate(source["outputs"]) if o["name"] == output)
        socket = next(s for s in target["inputs"] if s["name"] == input_name)
        link_id = len(self.links) + 1
        self.links.append([link_id, source["id"], slot, target["id"], target["inputs"].index(socket), socket["type"]])
        source["outputs"][slot]["links"].append(link_id)
        socket["link"] = link_id

    def to_json(self) -> dict:
        return {
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
            "version": 0.4,
        }


def base(g: Graph, checkpoint: str = CHECKPOINT, moa: str = MOA, size: int = 512) -> dict:
    """Checkpoint, CLIP vision, InsightFace, MoA weights, negative prompt, latent: shared by every example."""
    return base_without_moa(g, CLIP_VISION, checkpoint, size, moa)


def subject(g: Graph, parts: dict, image: str, y: int, previous: dict | None = None) -> dict:
    load = g.add("LoadImage", (PHOTOS, y), title=f"Subject photo: {image}", image=image)
    node = g.add("MoASubject", (SUBJECTS, y), faces="largest face", margin=0.3)
    g.connect(load, "IMAGE", node, "image")
    g.connect(parts["clip_vision"], "CLIP_VISION", node, "clip_vision")
    g.connect(parts["faces"], "face_analysis", node, "face_analysis")
    if previous is not None:
        g.connect(previous, "subjects", node, "subjects")
    return node


def apply(g: Graph, parts: dict, subjects: dict, text: str, words: str, y: int = 0) -> dict:
    node = g.add("MoAApply", (APPLY, y), text=text, subject_words=words)
    g.connect(parts["checkpoint"], "MODEL", node, "model")
    g.connect(parts["moa"], "moa_weights", node, "moa_weights")
    g.connect(parts["checkpoint"], "CLIP", node, "clip")
    g.connect(subjects, "subjects", node, "subjects")
    return node


def sample_and_show(g: Graph, parts: dict, moa: dict, y: int = 0, conds=None, prefix="MoA") -> None:
    """KSampler -> decode -> save, and the router masks over the image. `conds`: the (node, output)
    pairs of the positive and negative conditioning, if not MoA Apply's and the negative prompt."""
    positive, negative = conds or ((moa, "positive"), (parts["negative"], "CONDITIONING"))
    sampler = g.add("KSampler", (SAMPLE, y), **SAMPLER)
    g.connect(moa, "model", sampler, "model")
    g.connect(*positive, sampler, "positive")
    g.connect(*negative, sampler, "negative")
    g.connect(parts["latent"], "LATENT", sampler, "latent_image")
    decode_and_show(g, parts, moa, (sampler, "LATENT"), y, prefix)


def decode_and_show(g: Graph, parts: dict, moa: dict, latent: tuple[dict, str], y: int, prefix: str) -> None:
    """The sampled (node, output) latent decoded and saved, and the router masks over it."""
    decode = g.add("VAEDecode", (DECODE, y))
    g.connect(*latent, decode, "samples")
    g.connect(parts["checkpoint"], "VAE", decode, "vae")
    save = g.add("SaveImage", (SHOW, y), filename_prefix=prefix)
    g.connect(decode, "IMAGE", save, "images")
    masks = g.add("MoARouterMasks", (DECODE, y + 160), layers="cross-attention")  # its viewer makes it tall
    g.connect(moa, "router_record", masks, "router_record")
    g.connect(*latent, masks, "latent")
    g.connect(decode, "IMAGE", masks, "image")
    for i, output in enumerate(("masks", "layer_step_grid")):
        preview = g.add("PreviewImage", (SHOW + 360 * i, y + ROW), title=f"Router {output.replace('_', ' ')}")
        g.connect(masks, output, preview, "images")


def one_subject(info: dict, sdxl: bool = False) -> dict:
    g = Graph(info)
    parts = base(g, SDXL_CHECKPOINT, SDXL_MOA, 1024) if sdxl else base(g)
    person = subject(g, parts, "moa_subject_man.png", 0)
    moa = apply(g, parts, person, "a photo of a man hiking in the mountains, golden hour", "man")
    sample_and_show(g, parts, moa)
    return g.to_json()


def two_subjects(info: dict, sdxl: bool = False) -> dict:
    g = Graph(info)
    parts = base(g, SDXL_CHECKPOINT, SDXL_MOA, 1024) if sdxl else base(g)
    first = subject(g, parts, "moa_subject_man.png", 0)
    second = subject(g, parts, "moa_subject_woman.png", ROW, previous=first)
    text = "a man and a woman dancing at a street festival, photo"
    moa = apply(g, parts, second, text, "man, woman")
    sample_and_show(g, parts, moa)
    return g.to_json()


def controlnet(info: dict) -> dict:
    g = Graph(info)
    parts = base(g)
    person = subject(g, parts, "moa_subject_man.png", 0)
    moa = apply(g, parts, person, "a photo of a man doing yoga on a beach", "man")
    loader = g.add("ControlNetLoader", (PHOTOS, ROW), control_net_name=CONTROLNET)
    pose = g.add("LoadImage", (SUBJECTS, ROW), title="Pose image", image="moa_pose.png")
    control = g.add("ControlNetApplyAdvanced", (APPLY, ROW), strength=0.8, start_percent=0.0, end_percent=1.0)
    g.connect(moa, "positive", control, "positive")
    g.connect(parts["negative"], "CONDITIONING", control, "negative")
    g.connect(loader, "CONTROL_NET", control, "control_net")
    g.connect(pose, "IMAGE", control, "image")
    sample_and_show(g, parts, moa, conds=((control, "positive"), (control, "negative")))
    return g.to_json()


def morph(info: dict) -> dict:
    g = Graph(info)
    parts = base(g)
    first = subject(g, parts, "moa_subject_man.png", 0)
    second = subject(g, parts, "moa_subject_woman.png", ROW)
    blend = g.add("MoASubjectBlend", (SUBJECTS, 2 * ROW - 140), factor=0.5)
    g.connect(first, "subjects", blend, "subjects_a")
    g.connect(second, "subjects", blend, "subjects_b")
    moa = apply(g, parts, blend, "a portrait photo of a person in a cafe", "person")
    sample_and_show(g, parts, moa)
    return g.to_json()


def swap(info: dict) -> dict:
    g = Graph(info)
    parts = base(g)
    text = "a photo of a man reading a book on a park bench, autumn"
    for row, image in enumerate(("moa_subject_man.png", "moa_subject_woman.png")):
        y = row * 2 * ROW  # each run's masks and previews take two rows
        person = subject(g, parts, image, y)
        moa = apply(g, parts, person, text, "man", y)
        sample_and_show(g, parts, moa, y, prefix=f"MoA_swap_{row + 1}")
    return g.to_json()


def ipadapter_base(g: Graph) -> dict:
    """Checkpoint, CLIP ViT-H, InsightFace, the IP-Adapter, negative prompt, latent."""
    parts = base_without_moa(g, CLIP_VISION_H)
    parts["ipadapter"] = g.add("MoAIPAdapterLoader", (0, 420), ipadapter_name=IPADAPTER)
    return parts


def base_without_moa(
    g: Graph, clip_vision: str, checkpoint: str = CHECKPOINT, size: int = 512, moa: str | None = None
) -> dict:
    parts = {
        "checkpoint": g.add("CheckpointLoaderSimple", (0, 0), ckpt_name=checkpoint),
        "clip_vision": g.add("CLIPVisionLoader", (0, 160), clip_name=clip_vision),
        "faces": g.add("MoAInsightFaceLoader", (0, 280), model_pack="antelopev2", provider="CPU"),
    }
    if moa is not None:  # before the rest: node ids stay those of the published files
        parts["moa"] = g.add("MoALoader", (0, 420), moa_name=moa)
    parts |= {
        "negative": g.add("CLIPTextEncode", (LOADERS, 580), title="Negative prompt", text=NEGATIVE),
        "latent": g.add("EmptyLatentImage", (LOADERS, 760), width=size, height=size, batch_size=1),
    }
    g.connect(parts["checkpoint"], "CLIP", parts["negative"], "clip")
    return parts


def ipadapter_apply(g: Graph, parts: dict, subjects: dict, text: str, words: str, y: int = 0) -> dict:
    node = g.add("MoAIPAdapterApply", (APPLY, y), text=text, subject_words=words, weight=0.8)
    g.connect(parts["checkpoint"], "MODEL", node, "model")
    g.connect(parts["ipadapter"], "ipadapter", node, "ipadapter")
    g.connect(parts["checkpoint"], "CLIP", node, "clip")
    g.connect(subjects, "subjects", node, "subjects")
    g.connect(parts["clip_vision"], "CLIP_VISION", node, "clip_vision")
    return node


def ipadapter_two_people(info: dict) -> dict:
    """Two people from two photos, no masks: the router reads where the model draws "man" and "woman"."""
    g = Graph(info)
    parts = ipadapter_base(g)
    first = subject(g, parts, "moa_subject_man.png", 0)
    second = subject(g, parts, "moa_subject_woman.png", ROW, previous=first)
    node = ipadapter_apply(g, parts, second, "a man and a woman having coffee in a cafe, photo", "man, woman")
    sample_and_show(g, parts, node, prefix="MoA_IPAdapter")
    return g.to_json()


def ipadapter_controlnet(info: dict) -> dict:
    g = Graph(info)
    parts = ipadapter_base(g)
    person = subject(g, parts, "moa_subject_man.png", 0)
    node = ipadapter_apply(g, parts, person, "a photo of a man doing yoga on a beach", "man")
    loader = g.add("ControlNetLoader", (PHOTOS, ROW), control_net_name=CONTROLNET)
    pose = g.add("LoadImage", (SUBJECTS, ROW), title="Pose image", image="moa_pose.png")
    control = g.add("ControlNetApplyAdvanced", (APPLY, ROW), strength=0.8, start_percent=0.0, end_percent=1.0)
    g.connect(node, "positive", control, "positive")
    g.connect(parts["negative"], "CONDITIONING", control, "negative")
    g.connect(loader, "CONTROL_NET", control, "control_net")
    g.connect(pose, "IMAGE", control, "image")
    conds = ((control, "positive"), (control, "negative"))
    sample_and_show(g, parts, node, conds=conds, prefix="MoA_IPAdapter_pose")
    return g.to_json()


def photo_new_person(info: dict, ipadapter: bool = False) -> dict:
    """A photo in, the same photo with another person out: invert with the plain model, regenerate with MoA
    (or, with `ipadapter`, the IP-Adapter expert: no MoA weights)."""
    g = Graph(info)
    parts = ipadapter_base(g) if ipadapter else base(g)
    text = "a photo of a man standing on a beach"  # what the photo shows, its person named by the word
    photo = g.add("LoadImage", (LOADERS, ROW + 560), title="The photo: moa_photo.png", image="moa_photo.png")
    encode = g.add("VAEEncode", (PHOTOS, ROW + 560))
    g.connect(photo, "IMAGE", encode, "pixels")
    g.connect(parts["checkpoint"], "VAE", encode, "vae")
    describe = g.add("CLIPTextEncode", (PHOTOS, ROW + 720), title="Prompt describing the photo", text=text)
    g.connect(parts["checkpoint"], "CLIP", describe, "clip")
    invert = g.add("MoAInvert", (SUBJECTS, ROW + 560))
    g.connect(parts["checkpoint"], "MODEL", invert, "model")
    g.connect(describe, "CONDITIONING", invert, "positive")
    g.connect(parts["negative"], "CONDITIONING", invert, "negative")
    g.connect(encode, "LATENT", invert, "latent")
    person = subject(g, parts, "moa_subject_woman.png", 0)
    moa = (ipadapter_apply if ipadapter else apply)(g, parts, person, text, "man")
    regenerate = g.add("MoARegenerate", (SAMPLE, 0), keep_outside=True)  # the router record keeps the rest
    g.connect(moa, "model", regenerate, "model")
    g.connect(moa, "positive", regenerate, "positive")
    g.connect(parts["negative"], "CONDITIONING", regenerate, "negative")
    g.connect(invert, "inversion", regenerate, "inversion")
    g.connect(moa, "router_record", regenerate, "router_record")
    decode_and_show(g, parts, moa, (regenerate, "latent"), 0, "MoA_IPAdapter_photo" if ipadapter else "MoA_photo")
    return g.to_json()


EXAMPLES = {
    "moa_one_subject": one_subject,
    "moa_two_subjects": two_subjects,
    "moa_controlnet_pose": controlnet,
    "moa_subject_morph": morph,
    "moa_subject_swap_fixed_seed": swap,
    "moa_ipadapter_two_people": ipadapter_two_people,
    "moa_ipadapter_controlnet_pose": ipadapter_controlnet,
    "moa_sdxl_one_subject": lambda info: one_subject(info, sdxl=True),
    "moa_sdxl_two_subjects": lambda info: two_subjects(info, sdxl=True),
    "moa_photo_new_person": photo_new_person,
    "moa_ipadapter_photo_new_person": lambda info: photo_new_person(info, ipadapter=True),
}


def main() -> None:
    info = object_info()
    folder = ROOT / "example_workflows"
    folder.mkdir(exist_ok=True)
    for name, build in EXAMPLES.items():
        (folder / f"{name}.json").write_text(json.dumps(build(info), indent=2) + "\n")
        print(f"wrote example_workflows/{name}.json")


if __name__ == "__main__":
    main()
