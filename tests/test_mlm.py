"""progtrain.mlm.mask_tokens: the one masked-LM corruption (training data and calibration)."""

import pytest
import torch

from progtrain.mlm import IGNORE_INDEX, mask_tokens


@pytest.mark.parametrize("shape", [(1, 64), (4, 32)])
def test_same_draws_as_transformers_collator(minilm_path, shape):
    """With the tokenizer's vocabulary and specials, the output is the collator's, token for token."""
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling

    tok = AutoTokenizer.from_pretrained(minilm_path)
    coll = DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=0.3)
    specials = list(tok.all_special_ids)
    for seed in range(20):
        ids = torch.randint(0, len(tok), shape, generator=torch.Generator().manual_seed(1000 + seed))
        ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id  # specials are never picked
        coll.generator = torch.Generator().manual_seed(seed)
        want = coll([{"input_ids": r.clone()} for r in ids])
        got_in, got_lab = mask_tokens(ids, 0.3, torch.Generator().manual_seed(seed), tok.mask_token_id,
                                      torch.arange(len(tok)), specials)
        assert torch.equal(got_in, want["input_ids"]) and torch.equal(got_lab, want["labels"])
        assert bool((got_lab[:, 0] == IGNORE_INDEX).all()) and bool((got_lab[:, -1] == IGNORE_INDEX).all())


def test_bert_rates_and_specials():
    g = torch.Generator().manual_seed(0)
    special, mask = 3, 1000
    ids = torch.randint(4, 1000, (400, 100), generator=g)
    ids[:, ::10] = special
    inp, lab = mask_tokens(ids, 0.15, g, mask, torch.arange(4, 1000), [special])
    picked = lab != IGNORE_INDEX
    free = ids != special
    assert not bool(picked[~free].any())  # specials never picked
    assert abs(picked.sum().item() / free.sum().item() - 0.15) < 0.01
    assert torch.equal(lab[picked], ids[picked]) and torch.equal(inp[~picked], ids[~picked])
    n = picked.sum().item()
    as_mask = (inp[picked] == mask).sum().item() / n
    changed = ((inp[picked] != mask) & (inp[picked] != ids[picked])).sum().item() / n
    assert abs(as_mask - 0.8) < 0.02 and abs(changed - 0.1) < 0.015  # and ~10% kept
    assert int(inp.min()) >= 3 and int(inp.max()) <= mask


def test_no_mask_token_and_at_least_one():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 50, (200, 50), generator=g)
    inp, lab = mask_tokens(ids, 0.15, g, None, torch.arange(10, 50))
    picked = lab != IGNORE_INDEX
    changed = (inp[picked] != ids[picked]).float().mean().item()
    assert abs(changed - 0.9 * (1 - 1 / 40)) < 0.03  # 90% redrawn uniformly from 40 ids
    ids = torch.tensor([[0, 11, 12, 0]])
    for seed in range(10):
        inp, lab = mask_tokens(ids, 0.0, torch.Generator().manual_seed(seed), 5, torch.arange(10, 50), [0],
                               at_least_one=True)
        picked = (lab != IGNORE_INDEX)[0].tolist()
        assert sum(picked) == 1 and not picked[0] and not picked[3]
