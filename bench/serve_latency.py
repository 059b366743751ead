"""What does serving over Ray Serve cost, and what does batching buy? Three measurements, each
against a baseline taken in the same run:

1. latency: HTTP p50 (keep-alive connection, one request at a time) minus in-process
   `Engine.generate` p50 for the same prompt and settings (goal ≤ 5 ms);
2. throughput: completions/s from 16 concurrent clients with `max_batch_size: 16` (the default,
   continuous batching) vs `max_batch_size: 1` (static), one replica each (goal ≥ 3×). Run
   twice: on the builtin tiny Llama (answers in 2–4 tokens, so the HTTP path dominates) and on
   a wider random-init Llama that generates all 32 asked tokens (the model dominates, as with
   real models);
3. autoscaling: seconds from the start of 16-client load until replicas reach max_replicas, and
   from the end of the load until they are back at 1 (goal ≤ 10 s / ≤ 30 s with these delays:
   upscale_delay_s 1, downscale_delay_s 5, metrics_interval_s 0.5, look_back_period_s 2).

4. tokens: generated tokens/s at 1, 4, 16 and 64 concurrent clients in three modes — one
   request per generate call (`max_batch_size: 1`, the baseline), static batches of 16, and
   continuous batching (`serve.batching: continuous`) — and p50/p95 time to the first streamed
   token and between tokens at 1 and 16 clients: the figures for a real model
   (`--tokens-only --target` a SmolLM2 checkpoint skips 1–3).

    .venv/bin/python bench/serve_latency.py [--target DIR] [--out bench/results/serve_latency.json]
    .venv/bin/python bench/serve_latency.py --tokens-only --target CHECKPOINT --out FILE
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import tempfile
import threading
import time

from _common import write_result  # bench/ is on sys.path when run as a script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORT = 8311
PROMPT, MAX_TOKENS = "12 13 14", 8


def ask(conn: http.client.HTTPConnection, prompt: str, max_tokens: int) -> dict:
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    if resp.status != 200:
        raise RuntimeError(f"{resp.status}: {data}")
    return data


def deploy(target: str, settings: list[str]) -> None:
    from raylm.serving.deploy import resolve_target, start

    start(resolve_target(target, [f"serve.port={PORT}", *settings]))


def replicas(state: str = "RUNNING") -> int:
    from ray import serve

    app = serve.status().applications.get("raylm")
    return app.deployments["Model"].replica_states.get(state, 0) if app else 0


def make_wide_model(path: str) -> str:
    """A random-init Llama (hidden 256, 4 layers) with the builtin char tokenizer: no download."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from raylm.models import build_char_tokenizer

    if not os.path.exists(os.path.join(path, "config.json")):
        tok = build_char_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
        tok.save_pretrained(path)
    return path


def latency(target: str, n: int) -> dict:
    import torch

    from raylm.serving.engine import Engine, Sampling

    # A replica with num_cpus: 1 runs torch on one thread (Ray sets OMP_NUM_THREADS): match it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = Engine([("m", target)])
    ids = engine.encode_prompt(PROMPT)
    local = []
    for _ in range(n + 10):
        t = time.perf_counter()
        text = engine.generate([("m", ids, Sampling(max_tokens=MAX_TOKENS))])[0].text
        local.append(time.perf_counter() - t)
    torch.set_num_threads(threads)
    del engine
    out: dict = {"requests": n, "in_process_p50_ms": statistics.median(local[10:]) * 1e3}
    for batching in ("continuous", "static"):
        deploy(
            target,
            [
                "serve.num_cpus=1",
                "serve.max_batch_size=16",
                "serve.max_ongoing_requests=32",
                f"serve.batching={batching}",
            ],
        )
        conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=60)
        remote, health, same = [], [], True
        for _ in range(n + 10):
            t = time.perf_counter()
            same &= ask(conn, PROMPT, MAX_TOKENS)["choices"][0]["text"] == text
            remote.append(time.perf_counter() - t)
            t = time.perf_counter()
            conn.request("GET", "/health")
            conn.getresponse().read()
            health.append(time.perf_counter() - t)
        http_p50 = statistics.median(remote[10:])
        # /health goes through the same proxy, gateway and replica without touching the model:
        # it splits the overhead into "getting there" and "the model call inside a replica".
        out[batching] = {
            "http_p50_ms": http_p50 * 1e3,
            "http_overhead_ms": http_p50 * 1e3 - out["in_process_p50_ms"],
            "health_p50_ms": statistics.median(health[10:]) * 1e3,
            "same_text": same,
        }
    out["goal_ms"] = 5.0
    return out


def load(
    clients: int,
    seconds: float | None,
    per_client: int | None,
    stop: threading.Event | None = None,
    max_tokens: int = 16,
) -> dict:
    """`clients` threads on keep-alive connections; returns completions, tokens, errors and wall
    time."""
    done, tokens, errors = [0], [0], []
    lock = threading.Lock()

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=120)
        k, end = 0, (time.monotonic() + seconds) if seconds else None
        while (
            (per_client is None or k < per_client)
            and (end is None or time.monotonic() < end)
            and not (stop and stop.is_set())
        ):
            try:
                answer = ask(conn, f"{i} {k} {i + k}", max_tokens)
                with lock:
                    done[0] += 1
                    tokens[0] += answer["usage"]["completion_tokens"]
            except Exception as exc:  # counted, not fatal: the bench reports failures
                errors.append(repr(exc))
                conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=120)
            k += 1

    t = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    return {
        "completions": done[0],
        "tokens": tokens[0],
        "errors": len(errors),
        "wall_s": wall,
        "per_s": done[0] / wall,
        "tokens_per_s": tokens[0] / wall,
    }


def stream_times(prompt: str, max_tokens: int) -> tuple[float, list[float]]:
    """A streamed completion: seconds to its first text piece, and the gaps between pieces."""
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=300)
    body = json.dumps(
        {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    )
    t = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    arrivals = []
    for line in resp:
        if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
            arrivals.append(time.perf_counter() - t)
    if not arrivals:
        raise RuntimeError("the stream ended without text")
    return arrivals[0], [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]


def stream_latency(clients: int, max_tokens: int) -> dict:
    """p50/p95 time to first token and inter-token gap of streams from `clients` concurrent
    clients (each sends at least two)."""
    firsts: list[float] = []
    gaps: list[float] = []
    lock = threading.Lock()

    def streams(i: int) -> None:
        for k in range(max(2, 8 // clients)):
            first, between = stream_times(f"{i} {k}", max_tokens)
            with lock:
                firsts.append(first)
                gaps.extend(between)

    threads = [threading.Thread(target=streams, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()

    def pct(xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return xs[int(q * (len(xs) - 1))] if xs else float("nan")

    return {
        "ttft_p50_s": pct(firsts, 0.5),
        "ttft_p95_s": pct(firsts, 0.95),
        "itl_p50_s": pct(gaps, 0.5),
        "itl_p95_s": pct(gaps, 0.95),
    }


# The serving modes compared by `tokens`: one request per generate call (the baseline), static
# `serve.batch` batches of up to 16, and continuous batching with up to 16 running requests.
MODES = {
    "batch_1": ["serve.max_batch_size=1", "serve.batching=static"],
    "static_16": ["serve.max_batch_size=16", "serve.batching=static"],
    "continuous_16": ["serve.max_batch_size=16", "serve.batching=continuous"],
}


def tokens(target: str, requests: int, max_tokens: int, clients: list[int]) -> dict:
    """Generated tokens/s by concurrency in each mode (at least `requests` per load, each client
    sending the same number); stream latency at 1 and 16 clients."""
    out: dict = {"max_tokens": max_tokens, "clients": clients}
    for mode, settings in MODES.items():
        deploy(
            target,
            [
                "serve.num_cpus=1",
                f"serve.max_ongoing_requests={max(64, max(clients))}",
                f"serve.max_new_tokens={max_tokens}",
                *settings,
            ],
        )
        load(2, None, 1, max_tokens=max_tokens)  # warm-up
        for c in clients:
            out[f"{mode}_clients_{c}"] = load(
                c, None, max(1, -(-requests // c)), max_tokens=max_tokens
            )
        for c in (1, 16):
            out[f"{mode}_stream_clients_{c}"] = stream_latency(c, max_tokens)
    for mode in ("static_16", "continuous_16"):
        for c in clients:
            out[f"ratio_{mode}_clients_{c}"] = (
                out[f"{mode}_clients_{c}"]["tokens_per_s"]
                / out[f"batch_1_clients_{c}"]["tokens_per_s"]
            )
    return out


def throughput(target: str, per_client: int, max_tokens: int) -> dict:
    out: dict = {"max_tokens": max_tokens}
    for batch in (1, 16):
        deploy(
            target,
            [
                "serve.num_cpus=1",
                f"serve.max_batch_size={batch}",
                "serve.max_ongoing_requests=32",
                # the baseline: one request per generate call; 16: the default batching
                *(["serve.batching=static"] if batch == 1 else []),
            ],
        )
        load(16, None, 2, max_tokens=max_tokens)  # warm-up
        out[f"batch_{batch}"] = load(16, None, per_client, max_tokens=max_tokens)
    out["ratio"] = out["batch_16"]["per_s"] / out["batch_1"]["per_s"]
    out["goal"] = 3.0
    return out


def scaling(target: str, max_replicas: int) -> dict:
    deploy(
        target,
        [
            "serve.num_cpus=0.5",
            "serve.max_batch_size=4",
            "serve.max_ongoing_requests=8",
            "serve.autoscaling.min_replicas=1",
            f"serve.autoscaling.max_replicas={max_replicas}",
            "serve.autoscaling.target_ongoing_requests=2",
            "serve.autoscaling.upscale_delay_s=1",
            "serve.autoscaling.downscale_delay_s=5",
            "serve.autoscaling.metrics_interval_s=0.5",
            "serve.autoscaling.look_back_period_s=2",
        ],
    )
    stop = threading.Event()
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(load(16, None, None, stop)), daemon=True)
    t0 = time.monotonic()
    runner.start()
    trace = []
    up = down = decided = None
    while time.monotonic() - t0 < 90:
        trace.append((round(time.monotonic() - t0, 1), replicas()))
        if decided is None and replicas("STARTING") > 0:
            decided = time.monotonic() - t0  # the autoscaler asked for more; now they boot
        if trace[-1][1] >= max_replicas:
            up = time.monotonic() - t0
            break
        time.sleep(0.25)
    time.sleep(3)  # hold the load a moment at full size
    stop.set()
    runner.join()
    t1 = time.monotonic()
    while time.monotonic() - t1 < 120:
        n = replicas()
        trace.append((round(time.monotonic() - t0, 1), n))
        if n == 1:
            down = time.monotonic() - t1
            break
        time.sleep(0.25)
    return {
        "max_replicas": max_replicas,
        "scale_up_s": up,
        "upscale_decided_s": decided,
        "scale_down_s": down,
        "goal_up_s": 10.0,
        "goal_down_s": 30.0,
        "load": result,
        "trace": [t for i, t in enumerate(trace) if i == 0 or t[1] != trace[i - 1][1]],
    }


def print_tokens(tok: dict) -> None:
    head = "".join(f"{m + ' tok/s':>20}" for m in MODES)
    print(f"{'clients':>7}{head}  ratios (÷ batch_1)")
    for c in tok["clients"]:
        row = "".join(f"{tok[f'{m}_clients_{c}']['tokens_per_s']:20.1f}" for m in MODES)
        ratios = ", ".join(
            f"{m} {tok[f'ratio_{m}_clients_{c}']:.2f}×" for m in ("static_16", "continuous_16")
        )
        print(f"{c:7}{row}  {ratios}")
    for m in MODES:
        for c in (1, 16):
            t = tok[f"{m}_stream_clients_{c}"]
            print(
                f"streams, {m}, {c} client(s): first token p50 {t['ttft_p50_s'] * 1e3:.0f} ms "
                f"p95 {t['ttft_p95_s'] * 1e3:.0f} ms; between tokens p50 "
                f"{t['itl_p50_s'] * 1e3:.0f} ms p95 {t['itl_p95_s'] * 1e3:.0f} ms"
            )


def main() -> None:
    import ray

    from raylm.models import materialize_tiny_llama
    from raylm.serving.deploy import shutdown

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--target", default=None, help="checkpoint or model dir (default: builtin tiny Llama)"
    )
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument(
        "--tokens-only",
        action="store_true",
        help="only the tokens/s and time-to-first-token measurement (4.)",
    )
    parser.add_argument("--per-client", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=32, help="per answer in (4.)")
    parser.add_argument(
        "--clients", default="1,4,16,64", help="concurrent clients in (4.), comma-separated"
    )
    parser.add_argument("--max-replicas", type=int, default=min(4, os.cpu_count() * 2))
    parser.add_argument(
        "--out", default=os.path.join(REPO, "bench", "results", "serve_latency.json")
    )
    args = parser.parse_args()
    target = args.target or str(materialize_tiny_llama())
    ray.init(num_cpus=os.cpu_count(), log_to_driver=False)
    if args.tokens_only:
        try:
            result = {
                "target": target,
                "cpus": os.cpu_count(),
                "tokens": tokens(
                    target,
                    args.per_client * 4,
                    args.max_tokens,
                    [int(c) for c in args.clients.split(",")],
                ),
            }
        finally:
            shutdown()
        print_tokens(result["tokens"])
        write_result(args.out, result)
        return
    try:
        wide = make_wide_model(os.path.join(tempfile.gettempdir(), "raylm-bench-wide-llama"))
        result = {
            "target": target,
            "cpus": os.cpu_count(),
            "latency": latency(target, args.requests),
            "throughput": throughput(target, args.per_client, 16),
            "throughput_wide_model": throughput(wide, args.per_client, 32),
            "scaling": scaling(target, args.max_replicas),
        }
    finally:
        shutdown()
    lat, sc = result["latency"], result["scaling"]
    for batching in ("continuous", "static"):
        one = lat[batching]
        print(
            f"latency ({batching}): in-process p50 {lat['in_process_p50_ms']:.2f} ms, "
            f"HTTP p50 {one['http_p50_ms']:.2f} ms → overhead {one['http_overhead_ms']:.2f} ms "
            f"(goal ≤ 5; /health alone {one['health_p50_ms']:.2f} ms), "
            f"same text: {one['same_text']}"
        )
    for key in ("throughput", "throughput_wide_model"):
        thr = result[key]
        print(
            f"{key}: batch 1 {thr['batch_1']['per_s']:.1f}/s, "
            f"batch 16 {thr['batch_16']['per_s']:.1f}/s "
            f"→ {thr['ratio']:.2f}× (goal ≥ 3), "
            f"errors {thr['batch_1']['errors'] + thr['batch_16']['errors']}"
        )
    print(
        f"scaling:    1 → {sc['max_replicas']} in {sc['scale_up_s']} s "
        f"(goal ≤ 10; new replicas requested "
        f"at {sc['upscale_decided_s']} s), back to 1 in "
        f"{sc['scale_down_s']} s (goal ≤ 30); trace (s, replicas) {sc['trace']}"
    )
    write_result(args.out, result)


if __name__ == "__main__":
    main()
