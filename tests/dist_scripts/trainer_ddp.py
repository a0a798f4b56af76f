"""A short ProgressiveTrainer run with one growth, for one process or ``accelerate launch`` (DDP).

Run as ``accelerate launch --config_file launch/cpu_ddp2.yaml tests/dist_scripts/trainer_ddp.py --out DIR``.
Trains a tiny GPT-2 on fixed random tokens for 6 optimizer steps (2 micro-batches per step, so the
accumulation path of DDP's ``no_sync`` is used), grows it at step 3 (hidden 32 -> 64, 2 -> 3 layers,
function preserving) and writes, per rank, ``DIR/rank{R}.pt``: the final state dict, the world size,
the growth history's steps and the sizes of the final config.
"""

from __future__ import annotations

import argparse
import os

import torch
import transformers as T

from progtrain.integrations import ProgressiveTrainer

VOCAB, SEQ = 64, 16


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=SEQ,
                                           bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                           attn_pdrop=0.0))
    args = T.TrainingArguments(os.path.join(a.out, "run"), max_steps=6, per_device_train_batch_size=2,
                               gradient_accumulation_steps=2, learning_rate=3e-3, warmup_steps=2,
                               lr_scheduler_type="cosine", save_strategy="no", report_to=[], use_cpu=True,
                               disable_tqdm=True, logging_steps=1, seed=0)
    trainer = ProgressiveTrainer(model=model, args=args, train_dataset=Tokens(64), stages=[
        {"name": "wide", "start_step": 3, "grow": {"hidden_size": 64, "num_heads": 8, "num_layers": 3},
         "rewarm_steps": 1}])
    trainer.train()
    m = trainer.model
    torch.save({
        "world_size": trainer.args.world_size,
        "growth_steps": [h["step"] for h in trainer.growth_history],
        "sizes": (m.config.n_embd, m.config.n_layer, m.config.n_head),
        "ddp": type(trainer.model_wrapped).__name__,
        "state": {k: v.detach().clone() for k, v in m.state_dict().items()},
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }, os.path.join(a.out, f"rank{trainer.args.process_index}.pt"))


if __name__ == "__main__":
    main()
