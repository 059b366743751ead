"""Baseline for bench/train_overhead.py: the same model, data and batches as a raylm job, trained
by a bare torchrun + gloo DDP loop with torch's AdamW. Run by the bench, not by hand:

    torchrun --nproc_per_node 2 bench/_ddp_baseline.py JOB OUT_JSON [ddp|deepspeed]

`deepspeed` swaps DDP + AdamW for `deepspeed.initialize` with raylm's own DeepSpeed config, so
the bench can tell DeepSpeed's per-step cost from Ray's.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from raylm.data import build_datasets, collate, shard_indices
from raylm.job import load_job
from raylm.models import build_model, build_tokenizer
from raylm.training.loop import plan_steps


def main() -> None:
    spec = load_job(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(spec.training.seed)
    tok, model = build_tokenizer(spec), build_model(spec)
    train = build_datasets(spec, tok).train
    plan = plan_steps(spec, len(train), world)
    use_ds = len(sys.argv) > 3 and sys.argv[3] == "deepspeed"
    if use_ds:
        import deepspeed

        from raylm.training.ds_config import build_ds_config

        engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=build_ds_config(spec, world, plan.total_steps),
        )
    else:
        ddp = DistributedDataParallel(model)
        opt = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=spec.training.lr
        )
    micro = spec.training.micro_batch_size
    times, first_step, step, epoch = [], None, 0, 0
    while step < plan.total_steps:
        order = shard_indices(
            len(train), rank, world, epoch, spec.training.seed, plan.steps_per_epoch * micro
        )
        for m in range(len(order) // micro):
            t = time.time()
            batch = collate(
                [train[i] for i in order[m * micro : (m + 1) * micro]], tok.pad_token_id
            )
            if use_ds:
                loss = engine(**batch).loss
                engine.backward(loss)
                engine.step()
            else:
                loss = ddp(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), spec.training.max_grad_norm)
                opt.step()
                opt.zero_grad()
            loss.item()
            times.append(time.time() - t)
            first_step = first_step or time.time()
            step += 1
            if step >= plan.total_steps:
                break
        epoch += 1
    if rank == 0:
        skip = min(20, len(times) // 4)  # warm-up steps are not steady state
        with open(sys.argv[2], "w") as f:
            json.dump(
                {
                    "first_step_unix": first_step,
                    "steps": step,
                    "step_time_p50_s": statistics.median(times[skip:]),
                },
                f,
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
