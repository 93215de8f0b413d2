import torch

from comfyui_moa.moa_world import judges as J
from comfyui_moa.moa_world import scenes as S


def test_subject_crop_keeps_only_the_masked_subject_squared():
    scene = S.sample_scene(3, identities=(S.HELD_OUT[0],), n_objects=0)
    r = S.render(scene)
    crop = J.subject_crop(r.image[None], r.subject_masks[:1], size=24)
    assert crop.shape == (1, 3, 24, 24)
    other = S.render(S.Scene("night", scene.texture, scene.creatures, (), ""))  # same creature, other background
    torch.testing.assert_close(crop, J.subject_crop(other.image[None], other.subject_masks[:1]), atol=1e-6, rtol=0)
    assert not torch.equal(J.subject_crop(r.image[None], None), crop)


def test_judges_round_trip_through_their_file(tmp_path):
    torch.manual_seed(0)
    judges = J.Judges(J.SceneJudge(), J.Segmenter(), J.IdentityJudge(), {"seed": 0})
    judges.save(tmp_path)
    again = J.Judges.load(tmp_path)
    images = torch.stack([S.render(s).image for s in S.generic_scenes(4, 1)])
    assert torch.equal(judges.background(images), again.background(images))
    assert torch.equal(judges.subject_masks(images), again.subject_masks(images))
    assert judges.subject_masks(images).shape == (4, 2, 32, 32)
    assert judges.objects(images).shape == (4, 2, 3)


def test_the_identity_judge_names_the_held_out_identity_whose_attributes_fit_best():
    torch.manual_seed(0)
    judge = J.IdentityJudge()
    crops = torch.rand(5, 3, 24, 24)
    logp = judge(crops)
    assert [lp.shape[1] for lp in logp] == [2, 6, 3, 6]
    scores = judge.held_out_scores(crops)
    for i, identity in enumerate(S.HELD_OUT):
        word, body, layout, mark = S.attribute_indices(identity)
        expected = logp[0][:, word] + logp[1][:, body] + logp[2][:, layout] + logp[3][:, mark]
        torch.testing.assert_close(scores[:, i], expected)
    assert S.attribute_indices(S.HELD_OUT[0]) == (0, 0, 2, 3)  # cat, orange, rear, white
