"""The multimodal prompt: which tokens carry which subject, and the personal branch's context."""

from dataclasses import dataclass

import torch

from .errors import ConditioningError
from .fuser import Fuser


@dataclass(frozen=True)
class PersonalPrompt:
    """Subjects bound to the token positions of their words in a prompt's text embedding.

    positions [p] are token indices into the prompt's tokens (all 77-token windows laid end to
    end); subject_of_position [p] says which row of image_embeds [s, e] each of them carries.
    """

    prompt_length: int
    positions: torch.Tensor
    subject_of_position: torch.Tensor
    image_embeds: torch.Tensor

    def __post_init__(self) -> None:
        if self.positions.shape != self.subject_of_position.shape or self.positions.ndim != 1:
            raise ValueError("positions and subject_of_position must be 1-D and of one length")
        if self.positions.numel() and int(self.positions.max()) >= self.prompt_length:
            raise ValueError(f"a subject position lies beyond the prompt's {self.prompt_length} tokens")
        if self.subject_of_position.numel() and int(self.subject_of_position.max()) >= self.image_embeds.shape[0]:
            raise ValueError("a position refers to a subject that has no image embedding")


def personal_context(
    context: torch.Tensor,
    rows: torch.Tensor,
    prompt: PersonalPrompt,
    fuser: Fuser,
    timestep: torch.Tensor | None,
    layer: int | None,
) -> torch.Tensor:
    """The cross-attention context of the personal expert: context [b, t, d] with each subject
    word's tokens in `rows` (long [b']) fused with the subject's image embedding.

    ComfyUI repeats a batch's contexts to a common length, so t may be a multiple of the prompt's
    length: every copy of a subject token is fused. `timestep` [b'] and `layer` feed the fuser's
    conditioning.
    """
    t = context.shape[1]
    if t % prompt.prompt_length:
        raise ConditioningError(
            f"the positive conditioning has {t} tokens, which does not fit the {prompt.prompt_length}-token "
            "prompt MoA bound its subjects to; use the CONDITIONING output of MoAApply as the positive "
            "input of the sampler"
        )
    if rows.numel() == 0 or prompt.positions.numel() == 0:
        return context
    positions = prompt.positions.to(context.device)
    words = context[rows][:, positions]
    images = prompt.image_embeds[prompt.subject_of_position]
    fused = fuser(words, images, timestep, layer)
    copies = t // prompt.prompt_length
    all_positions = (
        positions[None] + prompt.prompt_length * torch.arange(copies, device=context.device)[:, None]
    ).reshape(-1)
    out = context.clone()
    row_view = out[rows]
    row_view[:, all_positions] = fused.repeat(1, copies, 1)
    out[rows] = row_view
    return out
