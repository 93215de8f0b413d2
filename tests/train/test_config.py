"""The trainer's settings: TOML into a frozen, validated TrainConfig; the layers each loss reads."""

import dataclasses

import pytest

from comfyui_moa.moa_core import ConfigError, LayerSpec, family_layer_paths, moa_init


def test_defaults_are_the_paper_notes_recipe():
    from moa_train.config import TrainConfig

    config = TrainConfig()
    assert (config.loss.router_weight, config.loss.object_weight) == (1.0, 1e-3)
    assert config.loss.router_subject_weight == 1.0  # not the paper's: settled on the small world
    assert config.loss.router_layers == ("all",) and config.loss.object_layers == ("fastcomposer",)
    assert (config.optim.lr_deltas, config.optim.lr_routers, config.optim.lr_fuser) == (1e-5, 1e-4, 1e-4)
    assert (config.optim.weight_decay, config.optim.betas, config.optim.grad_clip) == (1e-2, (0.9, 0.999), 1.0)
    assert (config.data.uncondition_prob, config.data.subject_keep_prob, config.data.max_subjects) == (0.1, 0.9, 4)
    assert (config.data.resolution, config.data.subject_resolution) == (512, 224)


def test_a_toml_file_resolves_relative_paths_against_its_folder(tmp_path):
    from moa_train.config import TrainConfig

    (tmp_path / "cfg.toml").write_text(
        '[model]\ncheckpoint = "models/sd15.safetensors"\n[data]\nroot = "/data/ffhq"\n'
        '[optim]\nbetas = [0.8, 0.99]\nlr_deltas = 1\n[run]\noutput = "runs/a"\nresume = "latest"\n'
    )
    config = TrainConfig.from_toml(tmp_path / "cfg.toml")
    assert config.model.checkpoint == str(tmp_path / "models/sd15.safetensors")
    assert config.data.root == "/data/ffhq" and config.run.output == str(tmp_path / "runs/a")
    assert config.run.resume == "latest" and config.optim.betas == (0.8, 0.99) and config.optim.lr_deltas == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optim.lr_deltas = 2.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[optimizer]\nlr = 1\n", r"unknown section \[optimizer\]; the sections are model, data"),
        ("[optim]\nlearning_rate = 1\n", "unknown setting 'learning_rate'; the settings are batch_size"),
        ("[optim]\nbatch_size = 2.5\n", r"\[optim\] batch_size: expected int, found 2.5"),
        ("[data]\naugment = 1\n", r"\[data\] augment: expected bool, found 1"),
        ("[optim]\nbetas = [0.9]\n", r"\[optim\] betas: expected 2 values, found 1"),
        ('[data]\nlayout = "coco"\n', r"\[data\] layout: 'coco' is not one of ffhq-wild, folder"),
        ("[data]\nuncondition_prob = 1.5\n", "must be a probability"),
        ("[data]\nresolution = 500\n", "multiple of 8"),
        ("[optim]\nlr_routers = -1\n", "must be 0 or more"),
        ("[moa]\nprior_init = 1.0\n", "strictly between 0 and 1"),
        ('[loss]\nweighting = "x0"\n', r"\[loss\] weighting: 'x0' is not one of eps, v"),
        ("[optim\n", "not valid TOML"),
    ],
)
def test_bad_settings_are_errors_that_name_the_setting(tmp_path, text, message):
    from moa_train.config import TrainConfig

    (tmp_path / "cfg.toml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_toml(tmp_path / "cfg.toml")


def full_sd15_weights():
    specs = [LayerSpec(p, 320, 768 if p.endswith("attn2") else 320, 320) for p in family_layer_paths("sd15")]
    return moa_init("sd15", specs)


def test_fastcomposer_object_layers_are_the_middle_cross_attention_layers_of_sd15():
    from moa_train.config import TrainConfig
    from moa_train.models import loss_plan

    weights = full_sd15_weights()
    plan = loss_plan(TrainConfig(), weights)
    assert plan.router_layers == tuple(range(32))
    blocks = [weights.paths[i].split(".1.transformer")[0] for i in plan.object_layers]
    assert blocks == [f"input_blocks.{i}" for i in (4, 5, 7, 8)] + ["middle_block"] + [
        f"output_blocks.{i}" for i in range(3, 9)
    ]
    assert all(weights.paths[i].endswith("attn2") for i in plan.object_layers)


def test_loss_layers_that_the_model_lacks_or_that_are_not_cross_attention_are_errors(models):
    from moa_train.config import TrainConfig
    from moa_train.models import build_weights, loss_plan

    weights = build_weights(TrainConfig(), models)  # the tiny UNet: no FastComposer layers
    with pytest.raises(ConfigError, match="list its attn2 layer paths"):
        loss_plan(TrainConfig(), weights)
    attn1 = TrainConfig().replace("loss", object_layers=(weights.paths[0],))
    with pytest.raises(ConfigError, match="cross-attention"):
        loss_plan(attn1, weights)
    missing = TrainConfig().replace("loss", router_layers=("output_blocks.11.1.transformer_blocks.0.attn1",))
    with pytest.raises(ConfigError, match="is not an attention layer of this model"):
        loss_plan(missing, weights)


def test_the_v_weighting_reaches_the_loss_plan(models):
    from moa_train.config import TrainConfig
    from moa_train.models import build_weights, loss_plan

    config = TrainConfig().replace("loss", object_layers=("all",))
    weights = build_weights(config, models)
    assert not loss_plan(config, weights).v_weighting  # the paper's eps loss by default
    assert loss_plan(config.replace("loss", weighting="v"), weights).v_weighting


@pytest.mark.parametrize("kind", ["V_PREDICTION", "CONST"])
def test_the_trainer_takes_v_predicting_models_and_refuses_flow_models(models, data_dirs, tmp_path, kind):
    import comfy.model_sampling as sampling
    import torch

    from moa_testing.training import proof_settings
    from moa_train.config import TrainConfig
    from moa_train.models import build_weights, training_model

    base = sampling.ModelSamplingDiscreteFlow if kind == "CONST" else sampling.ModelSamplingDiscrete
    model_sampling = type("Sampling", (base, getattr(sampling, kind)), {})(models.model.model.model_config)
    patched = models.model.clone()
    patched.add_object_patch("model_sampling", model_sampling)
    other = dataclasses.replace(models, model=patched)
    config = TrainConfig.from_dict(proof_settings(data_dirs[0], tmp_path))
    weights = build_weights(config, other)
    if kind == "CONST":
        with pytest.raises(ConfigError, match=r"\[model\] checkpoint: .* not flow models"):
            training_model(config, other, weights, torch.device("cpu"))
    else:
        step, _ = training_model(config, other, weights, torch.device("cpu"))
        assert step.frozen.model.get_model_object("model_sampling") is model_sampling
