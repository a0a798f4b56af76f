"""Masked-LM corruption: the one masking rule for training data and calibration batches."""

from __future__ import annotations

from typing import Sequence

import torch

IGNORE_INDEX = -100  # label of a position the loss skips (transformers' convention)


def mask_tokens(
    ids: torch.Tensor,
    probability: float,
    generator: torch.Generator,
    mask_id: int | None,
    random_ids: torch.Tensor,
    special_ids: Sequence[int] = (),
    at_least_one: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's 80/10/10 masking of token ids ``ids`` (any shape) -> ``(input_ids, labels)``, both
    int64 of ``ids``' shape.

    Each position whose token is not in ``special_ids`` is picked with ``probability``; a picked
    position's label is its token (``-100`` elsewhere) and its input becomes ``mask_id`` with
    probability 0.8, a token drawn uniformly from ``random_ids`` (1-D) with probability 0.1, and stays
    as it is otherwise (Devlin et al., 2019). Without a mask token (``mask_id`` None) the 80% branch
    draws a random token too. With ``at_least_one`` a call that picks nothing picks one non-special
    position uniformly, so a batch always has a label (else its loss is NaN).

    The draws from ``generator`` are those of transformers' ``DataCollatorForLanguageModeling``
    (``mlm=True``, default replace probabilities): with ``random_ids = arange(len(tokenizer))`` and
    ``special_ids = tokenizer.all_special_ids``, the same generator state gives the collator's
    output token for token.
    """
    ids = ids.long()
    shape = ids.shape
    special = torch.isin(ids, torch.as_tensor(list(special_ids), dtype=torch.long))
    prob = torch.full(shape, float(probability)).masked_fill_(special, 0.0)
    picked = torch.bernoulli(prob, generator=generator).bool()
    if at_least_one and not picked.any() and not special.all():
        free = (~special).view(-1).nonzero().squeeze(1)
        picked.view(-1)[free[int(torch.randint(0, len(free), (1,), generator=generator))]] = True
    labels = torch.where(picked, ids, torch.full_like(ids, IGNORE_INDEX))
    replaced = torch.bernoulli(torch.full(shape, 0.8), generator=generator).bool() & picked
    inputs = ids.clone()
    if mask_id is not None:
        inputs[replaced] = int(mask_id)
    randomised = torch.bernoulli(torch.full(shape, 0.5), generator=generator).bool() & picked & ~replaced
    words = random_ids[torch.randint(len(random_ids), shape, dtype=torch.long, generator=generator)]
    if mask_id is None:
        randomised |= replaced
    inputs[randomised] = words[randomised].long()
    return inputs, labels
