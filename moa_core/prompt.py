"""The multimodal prompt: which tokens carry which subject, and the personal branch's context."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from einops import rearrange

from .errors import ConditioningError
from .fuser import Fuser


@dataclass(frozen=True)
class PersonalPrompt:
    """Subjects bound to the tokens of their words in a prompt's text embedding.

    Row-wise, with r = 1 (one prompt for every cond row of a batch) or one row per cond row (a
    training batch): positions [r, p] are token indices into the prompt's tokens (its 77-token
    windows end to end), subjects [r, p] say which of the row's image_embeds [r, s, e] each of
    those tokens carries, -1 marking an unused slot.
    """

    prompt_length: int
    positions: torch.Tensor
    subjects: torch.Tensor
    image_embeds: torch.Tensor

    def __post_init__(self) -> None:
        if self.positions.ndim != 2 or self.positions.shape != self.subjects.shape:
            raise ValueError("positions and subjects must both be [rows, slots]")
        if self.image_embeds.ndim != 3 or self.image_embeds.shape[0] != self.positions.shape[0]:
            raise ValueError("image_embeds must be [rows, subjects, dim] with the rows of positions")
        used = self.subjects >= 0
        if bool((self.positions[used] >= self.prompt_length).any()):
            raise ValueError(f"a subject position lies beyond the prompt's {self.prompt_length} tokens")
        if bool((self.subjects >= self.image_embeds.shape[1]).any()):
            raise ValueError("a position refers to a subject that has no image embedding")

    @classmethod
    def single(
        cls, prompt_length: int, positions: Sequence[int], subjects: Sequence[int], image_embeds: torch.Tensor
    ) -> "PersonalPrompt":
        """One prompt for every cond row: token `positions[i]` carries subject `subjects[i]` of
        image_embeds [s, e]."""
        as_row = torch.tensor([list(positions)], dtype=torch.long).reshape(1, -1)
        subject_row = torch.tensor([list(subjects)], dtype=torch.long).reshape(1, -1)
        return cls(prompt_length, as_row, subject_row, image_embeds[None])


@dataclass(frozen=True)
class SubjectTokens:
    """The subject tokens of one model call, flat: token `tokens[i]` of batch row `rows[i]`
    carries subject `subjects[i]` (its image embedding `images[i]`), at diffusion timestep
    `timestep[i]`."""

    rows: torch.Tensor  # [k]
    tokens: torch.Tensor  # [k]
    subjects: torch.Tensor  # [k], indices into the row's subjects
    images: torch.Tensor  # [k, e]
    timestep: torch.Tensor | None  # [k]
    context_length: int


def subject_tokens(
    prompt: PersonalPrompt,
    cond_rows: Sequence[int],
    context_length: int,
    timestep: torch.Tensor | None,
    device: torch.device,
) -> SubjectTokens:
    """Lay `prompt` onto the cond rows of a batch whose cross-attention context has
    `context_length` tokens. ComfyUI repeats a batch's contexts to a common length, so that may be
    a multiple of the prompt's length: every copy of a subject token is included.

    `timestep` [b] holds the model call's timesteps for every batch row.
    """
    length = prompt.prompt_length
    if context_length % length:
        raise ConditioningError(
            f"the positive conditioning has {context_length} tokens, which does not fit the {length}-token "
            "prompt MoA bound its subjects to; use the CONDITIONING output of MoAApply as the positive "
            "input of the sampler"
        )
    rows = prompt.positions.shape[0]
    if rows not in (1, len(cond_rows)):
        raise ConditioningError(
            f"the prompt binds subjects for {rows} rows but the batch has {len(cond_rows)} cond rows"
        )
    positions, subjects = prompt.positions.cpu(), prompt.subjects.cpu()
    if rows == 1:
        positions, subjects = positions.expand(len(cond_rows), -1), subjects.expand(len(cond_rows), -1)
    row, slot = (subjects >= 0).nonzero(as_tuple=True)
    copies = torch.arange(context_length // length)
    tokens = rearrange(positions[row, slot][None] + length * copies[:, None], "c k -> (c k)")
    batch_rows = torch.tensor(list(cond_rows), dtype=torch.long)[row].repeat(len(copies))
    prompt_row = (row if rows > 1 else torch.zeros_like(row)).to(prompt.image_embeds.device)
    owners = subjects[row, slot]
    images = prompt.image_embeds[prompt_row, owners.to(prompt.image_embeds.device)]
    images = images.repeat(len(copies), 1).to(device)
    batch_rows, tokens, owners = batch_rows.to(device), tokens.to(device), owners.repeat(len(copies)).to(device)
    steps = None if timestep is None else timestep.to(device)[batch_rows]
    return SubjectTokens(batch_rows, tokens, owners, images, steps, context_length)


def subject_words(context: torch.Tensor, tokens: SubjectTokens) -> torch.Tensor:
    """The word tokens [k, d] of the subjects in context [b, t, d]."""
    if context.shape[1] != tokens.context_length:
        raise ConditioningError(
            f"a cross-attention context of {context.shape[1]} tokens reached MoA, which bound its subjects to "
            f"{tokens.context_length}; another node changes the text context after MoAApply"
        )
    return context[tokens.rows, tokens.tokens]


def fuse_subjects(context: torch.Tensor, tokens: SubjectTokens, fuser: Fuser) -> torch.Tensor:
    """The subject tokens of context [b, t, d], each fused with its subject's image embedding, for
    every cross-attention layer: [layers, k, d] in one fuser call (a model call's layers share
    their words and timesteps, only the layer embedding differs), [1, k, d] for a fuser that is
    not layer-conditioned."""
    words = subject_words(context, tokens)
    if not len(words):  # no cond rows, or no subject in the prompt
        return words[None]
    layers = fuser.config.num_layers if fuser.config.layer_conditioning else 1
    index = torch.arange(layers, device=context.device)[:, None]
    return fuser(words.expand(layers, -1, -1), tokens.images, tokens.timestep, index)


def personal_context(context: torch.Tensor, tokens: SubjectTokens, fused: torch.Tensor, layer: int) -> torch.Tensor:
    """The cross-attention context of the personal expert at cross-attention layer `layer`:
    context [b, t, d] with its subject tokens replaced by their fuse_subjects output `fused`."""
    if tokens.rows.numel() == 0:
        return context
    return context.index_put((tokens.rows, tokens.tokens), fused[layer if len(fused) > 1 else 0])


def subject_attention(q: torch.Tensor, k: torch.Tensor, heads: int, tokens: SubjectTokens) -> torch.Tensor:
    """How much each pixel attends to each subject token: softmax(q k^T / sqrt(d)) at the subject
    tokens, from q [b, n, h*d] and k [b, t, h*d] -> [k, h, n] (what the object loss reads)."""
    q = rearrange(q[tokens.rows], "k n (h d) -> k h n d", h=heads)
    keys = rearrange(k[tokens.rows], "k t (h d) -> k h t d", h=heads)
    scores = torch.einsum("khnd,khtd->khnt", q.float(), keys.float()) * q.shape[-1] ** -0.5
    probs = scores.softmax(dim=-1)
    index = tokens.tokens[:, None, None, None].expand(-1, probs.shape[1], probs.shape[2], 1)
    return probs.gather(-1, index)[..., 0]
