"""The timed loop of the bench's outside models (transformers, torchtitan): their own model in a plain
step (bf16 autocast on CUDA, fused AdamW), timed as the trainer's variants are: one warm-up pass of
`steps` steps, then `steps` measured ones, per phase from `launch/profiling.PhaseTimer`."""

from __future__ import annotations

import time

PHASES = ("forward", "backward", "optimizer")


def phase_means(timer) -> dict:
    """forward_s, backward_s, optimizer_s: seconds per measured step (None where a phase was not timed)."""
    means = timer.means()
    return {**{f"{p}_s": means.get(p) for p in PHASES}, "phases_measured_with": timer.measured_with}


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mean_cross_entropy(logits, labels):
    import torch.nn.functional as F

    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def time_plain_loop(
    logits_of, model, vocab_size: int, args, device, max_norm: float | None = None, loss_of=mean_cross_entropy
) -> dict:
    """tokens_per_s, first_step_s, steady_step_s, peak_mem_gib, final_loss and the phases of
    `logits_of(model, inputs)` trained on random tokens. `max_norm` clips the gradient as the outside
    trainer would (torchtitan: 1.0, one foreach pass); None leaves it unclipped. `loss_of(logits,
    labels)`: the outside trainer's own loss (torchtitan's, compiled when its model is)."""
    import torch

    from moeflow.launch.profiling import PhaseTimer

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    gen = torch.Generator(device="cpu").manual_seed(0)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    timer = PhaseTimer(device, first_step=1)  # step 0: warm-up, 1: the measured steps

    def step(measured: int = 0):
        timer.begin(measured)
        x = torch.randint(0, vocab_size, (args.batch_size, args.seq_len + 1), generator=gen).to(device)
        with autocast:
            logits = logits_of(model, x[:, :-1])
        loss = loss_of(logits, x[:, 1:])
        timer.mark("forward")
        loss.backward()
        timer.mark("backward")
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        timer.mark("optimizer")
        timer.end()
        return loss

    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(args.steps - 1):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(args.steps):
        loss = step(measured=1)
    sync(device)
    tok_s = args.steps * args.batch_size * args.seq_len / (time.perf_counter() - t)
    return {
        "tokens_per_s": tok_s,
        "first_step_s": first,
        "steady_step_s": args.batch_size * args.seq_len / tok_s,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "final_loss": loss.item(),
        "autocast": "bfloat16" if device.type == "cuda" else None,  # fp32 on a CPU
        **phase_means(timer),
    }
