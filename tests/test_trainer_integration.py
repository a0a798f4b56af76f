"""progtrain.integrations.ProgressiveTrainer: a real transformers.Trainer growing a tiny model on CPU.

(a) growth at the planned steps, sizes, loss kept across a function-preserving growth, Adam's moments
carried; (b) Trainer checkpoints across a growth resume onto the uninterrupted path; (c) 2-process
DDP; options Trainer cannot honour refused; the README's Trainer example runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as T

from progtrain.errors import ProgtrainConfigError
from progtrain.integrations import ProgressiveTrainer, load_stages

from _launch import REPO, run_launch

VOCAB, SEQ, STEPS = 64, 16, 8
STAGES = [
    {"name": "wide", "start_step": 3, "grow": {"hidden_size": 64, "num_heads": 8}, "rewarm_steps": 2},
    {"name": "deep", "start_step": 6, "grow": {"num_layers": 4, "layer_placement": "interleave"}},
]


class Tokens(torch.utils.data.Dataset):
    """Fixed random token sequences (causal LM: labels = inputs)."""

    def __init__(self, n: int = 64, mlm: bool = False) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(4, VOCAB, (n, SEQ), generator=g)
        self.mlm = mlm
        self.pick = torch.rand((n, SEQ), generator=g) < 0.25

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i]
        if not self.mlm:
            return {"input_ids": ids, "labels": ids}
        pick = self.pick[i]
        return {"input_ids": torch.where(pick, torch.full_like(ids, 3), ids),
                "labels": torch.where(pick, ids, torch.full_like(ids, -100)),
                "attention_mask": torch.ones_like(ids)}


def gpt2() -> T.GPT2LMHeadModel:
    torch.manual_seed(0)
    return T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=SEQ,
                                          bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                          attn_pdrop=0.0))


def bert() -> T.BertForMaskedLM:
    torch.manual_seed(0)
    return T.BertForMaskedLM(T.BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                          num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=SEQ,
                                          pad_token_id=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def targs(out: Path, **kw) -> T.TrainingArguments:
    base = dict(max_steps=STEPS, per_device_train_batch_size=4, learning_rate=2e-3, warmup_steps=2,
                lr_scheduler_type="cosine", save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                logging_steps=1, seed=0, dataloader_num_workers=0)
    base.update(kw)
    return T.TrainingArguments(str(out), **base)


@torch.no_grad()
def batch_loss(model: torch.nn.Module, batch: dict) -> float:
    was = model.training
    model.eval()
    loss = model(**batch).loss.item()
    model.train(was)
    return loss


class Probe(ProgressiveTrainer):
    """Records, around each growth: the loss of a fixed batch and Adam's state by parameter name."""

    probe_batch: dict = {}

    def grow_to_stage(self, idx: int) -> None:
        opt = self.optimizer.optimizer

        def moments() -> dict:
            return {n: {k: v.detach().clone() for k, v in opt.state[p].items()}
                    for n, p in self.model.named_parameters() if p in opt.state}

        before, m_before = batch_loss(self.model, self.probe_batch), moments()
        super().grow_to_stage(idx)
        self.probes = getattr(self, "probes", []) + [dict(
            idx=idx, step=self.state.global_step, before=before, after=batch_loss(self.model, self.probe_batch),
            m_before=m_before, m_after=moments(), n_opt=sum(len(g["params"]) for g in opt.param_groups),
            n_params=len(list(self.model.parameters())))]


def probe_batch(ds: Tokens) -> dict:
    items = [ds[i] for i in range(8)]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ---------------------------------------------------------------------- (a) one process
def test_growth_schedule_in_trainer(tmp_path):
    ds = Tokens()
    model = gpt2()
    tr = Probe(model=model, args=targs(tmp_path), train_dataset=ds, stages=STAGES)
    tr.probe_batch = probe_batch(ds)
    tr.train()

    # grew at the planned steps, to the planned sizes, in the same model object
    assert [p["step"] for p in tr.probes] == [3, 6]
    assert tr.model is model and tr.stage == 2
    assert (model.config.n_embd, model.config.n_head, model.config.n_layer) == (64, 8, 4)
    assert model.transformer.wte.weight.shape == (VOCAB, 64) and len(model.transformer.h) == 4
    assert model.lm_head.weight is model.transformer.wte.weight  # tying survives the move into the object
    assert tr.state.global_step == STEPS
    # every trained parameter is in the optimizer after each growth
    for p in tr.probes:
        assert p["n_opt"] == p["n_params"]

    # function-preserving growths keep the loss of the same batch
    for p in tr.probes:
        assert abs(p["after"] - p["before"]) <= 1e-5 * abs(p["before"]), p

    # width growth (hidden 32 -> 64, stream tiled k=2): wte is a writer of the stream (s=1), so every
    # grown element carries c = 1/(k s) = 1/2 of its source's exp_avg and 1/4 of its exp_avg_sq
    w = tr.probes[0]
    src = torch.tensor(tr.growth_history[0]["hidden_index_map"])
    assert (src >= 0).all() and len(src) == 64
    old, new = w["m_before"]["transformer.wte.weight"], w["m_after"]["transformer.wte.weight"]
    torch.testing.assert_close(new["exp_avg"], old["exp_avg"][:, src] / 2, rtol=1e-6, atol=0)
    torch.testing.assert_close(new["exp_avg_sq"], old["exp_avg_sq"][:, src] / 4, rtol=1e-6, atol=0)
    assert float(new["step"]) == float(old["step"]) == 3.0  # step count kept
    # an FFN row (c_fc reads the stream: fan-in split, s = 1/2, k = 2 -> c = 1): exp_avg equal at new positions
    old, new = w["m_before"]["transformer.h.0.mlp.c_fc.weight"], w["m_after"]["transformer.h.0.mlp.c_fc.weight"]
    n_ffn = old["exp_avg"].shape[1]
    torch.testing.assert_close(new["exp_avg"][:, :n_ffn], old["exp_avg"][src, :], rtol=1e-6, atol=0)

    # depth growth 2 -> 4, interleave: old layers 0, 1 sit at 0, 2 with their moments unchanged;
    # the new layers 1, 3 start with zero moments
    d = tr.probes[1]
    for suffix in ("attn.c_attn.weight", "mlp.c_proj.weight", "ln_1.weight"):
        for old_i, new_i in ((0, 0), (1, 2)):
            a, b = d["m_before"][f"transformer.h.{old_i}.{suffix}"], d["m_after"][f"transformer.h.{new_i}.{suffix}"]
            assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
        for new_i in (1, 3):
            b = d["m_after"][f"transformer.h.{new_i}.{suffix}"]
            assert not b["exp_avg"].any() and not b["exp_avg_sq"].any()
            assert float(b["step"]) == 6.0

    # the LR stays on the run-wide cosine schedule, times the re-warm ramp of stage 1 (steps 3, 4)
    lrs = {h["step"]: h["learning_rate"] for h in tr.state.log_history if "learning_rate" in h}
    cosine = T.get_scheduler("cosine", torch.optim.SGD([torch.zeros(1)], lr=1.0), num_warmup_steps=2,
                             num_training_steps=STEPS).lr_lambdas[0]
    base = {k: cosine(k) * 2e-3 for k in range(STEPS)}
    ramp = {3: 1 / 3, 4: 2 / 3}
    for step in range(STEPS):  # log at global_step g reports the LR of optimizer step g - 1
        assert lrs[step + 1] == pytest.approx(base[step] * ramp.get(step, 1.0), rel=1e-9)

    # growth events are in the log history
    events = [h for h in tr.state.log_history if "growth_stage" in h]
    assert [(e["step"], e["growth_stage"]) for e in events] == [(3, 1.0), (6, 2.0)]
    assert all(e["growth_rel_dlogits"] <= 1e-5 for e in events)


def test_bert_mlm_with_fade_in(tmp_path):
    """Post-norm BERT: width (tiled stream), heads and FFN growth (exact) and a depth growth faded in (exact at the growth)."""
    ds = Tokens(mlm=True)
    model = bert()
    stages = [{"start_step": 2, "grow": {"hidden_size": 64, "num_heads": 8, "intermediate_size": 128}},
              {"start_step": 4, "grow": {"num_layers": 3, "layer_placement": "top"}, "fade_in_steps": 3}]
    tr = Probe(model=model, args=targs(tmp_path, max_steps=8), train_dataset=ds, stages=stages)
    tr.probe_batch = probe_batch(ds)
    tr.train()
    assert (model.config.hidden_size, model.config.num_attention_heads, model.config.intermediate_size,
            model.config.num_hidden_layers) == (64, 8, 128, 3)
    assert [p["step"] for p in tr.probes] == [2, 4]
    for p in tr.probes:
        assert abs(p["after"] - p["before"]) <= 1e-5 * abs(p["before"]), p
    assert tr._fade is None  # the fade ended inside the stage (step 4 + 3 <= 8), hooks removed
    assert not any(layer._forward_hooks for layer in model.bert.encoder.layer)


# ---------------------------------------------------------------------- (b) resume across a growth
def test_resume_across_growth_matches_uninterrupted(tmp_path):
    ds = Tokens()

    class SaveAt(T.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (3, 4):  # 3: at a growth step (model before it); 4: after it
                control.should_save = True

    full = ProgressiveTrainer(model=gpt2(), args=targs(tmp_path / "a"), train_dataset=ds, stages=STAGES,
                              callbacks=[SaveAt()])
    full.train()
    want = params(full.model)
    want_losses = {h["step"]: h["loss"] for h in full.state.log_history if "loss" in h}
    ck3, ck4 = tmp_path / "a" / "checkpoint-3", tmp_path / "a" / "checkpoint-4"
    assert json.loads((ck3 / "config.json").read_text())["n_embd"] == 32
    assert json.loads((ck4 / "config.json").read_text())["n_embd"] == 64
    assert json.loads((ck4 / "config.json").read_text())["n_layer"] == 2

    for ck in (ck4, ck3):  # a fresh trainer with the initial model, resumed
        tr = ProgressiveTrainer(model=gpt2(), args=targs(tmp_path / f"b{ck.name}"), train_dataset=ds, stages=STAGES)
        tr.train(resume_from_checkpoint=str(ck))
        assert tr.model.config.n_layer == 4 and tr.stage == 2
        assert max_diff(params(tr.model), want) <= 1e-6, ck.name
        got = {h["step"]: h["loss"] for h in tr.state.log_history if "loss" in h}
        start = int(ck.name.split("-")[1])
        for step in range(start + 1, STEPS + 1):
            assert got[step] == pytest.approx(want_losses[step], rel=1e-6, abs=0), (ck.name, step)

    # the trainer that ran to the end (4 layers) resumes from checkpoint-4 (2 layers): rebuilt down
    full.train(resume_from_checkpoint=str(ck4))
    assert max_diff(params(full.model), want) <= 1e-6

    # a checkpoint of the wrong size for its step is refused before anything loads
    tr = ProgressiveTrainer(model=gpt2(), args=targs(tmp_path / "c"), train_dataset=ds,
                            stages=[dict(STAGES[0], start_step=5), STAGES[1]])
    with pytest.raises(ProgtrainConfigError, match="checkpoint-4 .*step 4.* stage 0"):
        tr.train(resume_from_checkpoint=str(ck4))
    # a second fresh run on a model this trainer already grew is refused
    with pytest.raises(ProgtrainConfigError, match="already grew"):
        full.train()


# ---------------------------------------------------------------------- (c) DDP
def test_ddp_two_processes(tmp_path):
    run_launch("ddp", REPO / "tests" / "dist_scripts" / "trainer_ddp.py", ["--out", str(tmp_path)],
               tmp_path / "log.txt", timeout=300)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["ddp"] == "DistributedDataParallel"
    assert r0["growth_steps"] == r1["growth_steps"] == [3]
    assert r0["sizes"] == r1["sizes"] == (64, 3, 8)
    assert len(r0["losses"]) == 6
    # the ranks saw different data: identical weights mean the grown model's gradients were all-reduced
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k


# ---------------------------------------------------------------------- schedules and refusals
def test_stages_from_run_yaml_and_fractions(tmp_path):
    stages = load_stages(REPO / "configs" / "gpt2_tiny_progressive.yaml")
    model = T.GPT2LMHeadModel(T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=SEQ))
    tr = ProgressiveTrainer(model=model, args=targs(tmp_path, max_steps=600), train_dataset=Tokens(), stages=stages)
    assert [(s.name, s.start_step) for s in tr.stages] == [("wide", 250), ("deep", 450)]
    frac = [{"start": 0.25, "grow": {"hidden_size": 64}}, {"start": 0.5, "grow": {"num_layers": 3}}]
    tr = ProgressiveTrainer(model=gpt2(), args=targs(tmp_path, max_steps=10), train_dataset=Tokens(), stages=frac)
    assert [s.start_step for s in tr.stages] == [3, 5]


@pytest.mark.parametrize("stage, match", [
    ({"start_step": 2, "grow": {"hidden_size": 64}, "lr_scales": True}, r"stages\[0\] \(stage1\)\.lr_scales"),
    ({"start_step": 2, "grow": {"hidden_size": 64}, "born_warmup_steps": 3}, r"\.born_warmup_steps"),
    ({"start_step": 2, "grow": {"hidden_size": 64}, "match_dynamics": True}, r"\.match_dynamics"),
    ({"start_step": 2, "grow": {"hidden_size": 64}, "mask_steps": 2}, r"\.mask_steps"),
    ({"start_step": 2, "grow": {"hidden_size": 64}, "moments": "keep"}, r"\.moments='keep' is not one of"),
    ({"start_tokens": 512, "grow": {"hidden_size": 64}}, r"\.start_tokens"),
    ({"start_step": 8, "grow": {"hidden_size": 64}}, r"at or after TrainingArguments\.max_steps=8"),
    ({"start_step": 2, "grow": {"hidden_size": 16}}, r"stages\[0\]"),
    ({"start_step": 2, "grow": {"hidden_size": 64}, "init": "nope"}, r"stages\[0\]"),
    ({"start_step": 2, "grow": {"hidden_size": 64}, "bogus": 1}, r"unknown key.*bogus"),
    ({"start": 1.5, "grow": {"hidden_size": 64}}, r"\.start must be a fraction"),
])
def test_refused_stage_options(tmp_path, stage, match):
    with pytest.raises(ProgtrainConfigError, match=match):
        ProgressiveTrainer(model=gpt2(), args=targs(tmp_path), train_dataset=Tokens(), stages=[stage])


def test_refused_setups(tmp_path):
    model = gpt2()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ProgtrainConfigError, match="optimizers="):
        ProgressiveTrainer(model=model, args=targs(tmp_path), train_dataset=Tokens(), stages=STAGES,
                           optimizers=(opt, None))
    with pytest.raises(ProgtrainConfigError, match="optim='adamw_torch'"):
        ProgressiveTrainer(model=gpt2(), args=targs(tmp_path, optim="sgd"), train_dataset=Tokens(),
                           stages=STAGES).train()
    with pytest.raises(ProgtrainConfigError, match="needs stages="):
        ProgressiveTrainer(model=gpt2(), args=targs(tmp_path), train_dataset=Tokens(), stages=[])


# The README's Trainer example runs in tests/test_readme.py with every other README python block.
