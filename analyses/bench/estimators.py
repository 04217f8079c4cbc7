"""Benchmarks: exact Bayes (and Gibbs at matched accuracy) and the MTD sampler, each against a
straightforward per-sequence Python implementation written here, printed as speed-up ratios.

Targets: exact Bayes for 256 sequences of length 192 with m = 3 in under 10 s; the
sampler at >= 1M tokens/s for a 1024 x 256 batch; each >= 50x its naive version. The naive
versions also serve as a correctness check: on the sequences where both run, their numbers are
compared with the fast ones and the largest difference is printed.

Run with ``mdlens bench --only estimators`` (``--quick`` for small sizes).
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch

from mdlens import MTDTask
from mdlens import estimators as E
from mdlens.analyses import TASK

FULL = {
    "bayes_batch": 256,
    "bayes_len": 192,
    "bayes_naive_subset": 2,
    "sampler_batch": 1024,
    "sampler_len": 256,
    "sampler_naive_subset": 64,
    "sampler_repeats": 3,
    "gibbs_tolerance": 3e-3,
    "gibbs_burn_in": 200,
    "gibbs_start": 1000,
    "gibbs_max": 8_000,
}
QUICK = {
    "bayes_batch": 32,
    "bayes_len": 48,
    "bayes_naive_subset": 2,
    "sampler_batch": 128,
    "sampler_len": 64,
    "sampler_naive_subset": 8,
    "sampler_repeats": 1,
    "gibbs_tolerance": 1e-2,
    "gibbs_burn_in": 50,
    "gibbs_start": 100,
    "gibbs_max": 5_000,
}


# ----------------------------------------------------------------------------------------------
# Naive reference implementations: one sequence at a time, plain Python / numpy.
# ----------------------------------------------------------------------------------------------


def _logaddexp(a: float, b: float) -> float:
    if a < b:
        a, b = b, a
    return a + math.log1p(math.exp(b - a))


def naive_exact_bayes(tokens: list[int], transition: np.ndarray, order: int, alpha: float) -> np.ndarray:
    """Posterior mean of lambda for one sequence, by a dict over lag-count vectors.

    W(n) = sum over lag assignments with counts n of prod_k pi(y_{k-z_k}, y_k), built token by
    token in log space: log W_k(n + e_g) = logsumexp over g of log W_{k-1}(n) + log pi(y_{k-g}, y_k).
    The posterior is the mixture of Dirichlet(alpha + n) with weights W(n) B(alpha + n) / B(alpha).
    """
    log_pi = np.log(transition).tolist()
    log_w: dict[tuple[int, ...], float] = {(0,) * order: 0.0}
    for k in range(order, len(tokens)):  # 0-based k: the tokens y_{m+1}..y_T
        step = [log_pi[tokens[k - g]][tokens[k]] for g in range(1, order + 1)]
        updated: dict[tuple[int, ...], float] = {}
        for counts, value in log_w.items():
            for g in range(order):
                key = (*counts[:g], counts[g] + 1, *counts[g + 1 :])
                new = value + step[g]
                updated[key] = _logaddexp(updated[key], new) if key in updated else new
        log_w = updated
    n_tokens = len(tokens) - order
    # log of W(n) B(alpha + n), dropping terms common to every n (B(alpha), Gamma(m alpha + N)).
    log_mix = {n: v + sum(math.lgamma(alpha + c) for c in n) for n, v in log_w.items()}
    top = max(log_mix.values())
    total = sum(math.exp(v - top) for v in log_mix.values())
    mean = np.zeros(order)
    for n, v in log_mix.items():
        mean += math.exp(v - top) / total * (alpha + np.asarray(n)) / (order * alpha + n_tokens)
    return mean


def naive_sample(
    transition: np.ndarray, order: int, alpha: float, batch_size: int, seq_len: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MTD sequences one at a time, one position at a time (inverse-CDF draws with numpy).

    Returns tokens [B, T], lags [B, T] (0 for the first m positions) and weights [B, m].
    """
    rng = np.random.default_rng(seed)
    q = transition.shape[0]
    cumulative_rows = np.cumsum(transition, axis=1)
    tokens = np.zeros((batch_size, seq_len), dtype=np.int64)
    lags = np.zeros((batch_size, seq_len), dtype=np.int64)
    weights = np.zeros((batch_size, order))
    for b in range(batch_size):
        lam = rng.dirichlet(np.full(order, alpha))
        cumulative_lam = np.cumsum(lam)
        weights[b] = lam
        for t in range(seq_len):
            if t < order:
                tokens[b, t] = rng.integers(q)
                continue
            lag = min(int(np.searchsorted(cumulative_lam, rng.random(), side="right")), order - 1) + 1
            source = tokens[b, t - lag]
            tokens[b, t] = min(int(np.searchsorted(cumulative_rows[source], rng.random(), side="right")), q - 1)
            lags[b, t] = lag
    return tokens, lags, weights


def naive_next_probs(tokens: np.ndarray, weights: np.ndarray, transition: np.ndarray) -> np.ndarray:
    """p(y_{T+1} = v) = sum_g lambda_g pi(y_{T+1-g}, v), one sequence at a time."""
    out = np.zeros((tokens.shape[0], transition.shape[0]))
    for b in range(tokens.shape[0]):
        for g in range(1, weights.shape[1] + 1):
            out[b] += weights[b, g - 1] * transition[tokens[b, -g]]
    return out


def lag_conditional_transitions(tokens: np.ndarray, lags: np.ndarray, order: int, q: int) -> np.ndarray:
    """Empirical P(y_t = v | y_{t - z_t} = u) from sampled tokens and their latent lags."""
    counts = np.zeros((q, q))
    t_index = np.arange(order, tokens.shape[1])
    sources = tokens[np.arange(tokens.shape[0])[:, None], t_index[None, :] - lags[:, order:]]
    np.add.at(counts, (sources.ravel(), tokens[:, order:].ravel()), 1.0)
    return counts / counts.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# The measurements.
# ----------------------------------------------------------------------------------------------


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def bench_bayes(task: MTDTask, sizes: dict) -> dict:
    pi, m = task.transition, task.order
    batch, seq_len = sizes["bayes_batch"], sizes["bayes_len"]
    sample = task.sample(batch, seq_len, generator=torch.Generator().manual_seed(7))
    tokens = sample.tokens
    n_states = math.comb(seq_len - m + m - 1, m - 1)
    print(f"exact Bayes: batch {batch} x length {seq_len}, m = {m} ({n_states} count vectors at the last step)")

    E.bayes_weights(tokens[:2, : m + 8], pi, m, method="exact")  # warm-up (allocator, kernels)
    cpu_start = time.process_time()
    exact, fast_s = _timed(lambda: E.bayes_weights(tokens, pi, m, alpha=task.alpha, method="exact"))
    cpu_s = time.process_time() - cpu_start  # summed over threads; on a loaded machine wall >> cpu/threads
    print(
        f"  fast exact DP:        {fast_s:8.3f} s for {batch} sequences  (target < 10 s: "
        f"{'met' if fast_s < 10 else 'NOT met'}); process CPU time {cpu_s:.3f} s"
    )

    subset = sizes["bayes_naive_subset"]
    pi_np = pi.numpy()
    naive, naive_s = _timed(
        lambda: np.stack([naive_exact_bayes(tokens[b].tolist(), pi_np, m, task.alpha) for b in range(subset)])
    )
    per_sequence = naive_s / subset
    ratio = per_sequence * batch / fast_s
    max_diff = float(np.abs(naive - exact[:subset].numpy()).max())
    print(
        f"  naive Python dict:    {per_sequence:8.3f} s per sequence ({subset} sequences) -> "
        f"{per_sequence * batch:.1f} s scaled to {batch}"
    )
    print(f"  speed-up fast/naive:  {ratio:8.1f}x  (target >= 50x: {'met' if ratio >= 50 else 'NOT met'})")
    print(f"  max |naive - fast| on the subset: {max_diff:.2e}")

    gibbs = gibbs_at_matched_accuracy(task, tokens, exact, fast_s, sizes)
    return {
        "exact_seconds": fast_s,
        "exact_cpu_seconds": cpu_s,
        "naive_seconds_per_sequence": per_sequence,
        "speedup": ratio,
        "max_abs_diff": max_diff,
        "gibbs": gibbs,
        "gibbs_tolerance": sizes["gibbs_tolerance"],
    }


def gibbs_at_matched_accuracy(
    task: MTDTask, tokens: torch.Tensor, exact: torch.Tensor, exact_s: float, sizes: dict
) -> dict:
    """Gibbs-sampled Bayes run until its mean |Gibbs - exact| is within ``sizes["gibbs_tolerance"]``,
    timed against exact Bayes's ``exact_s``; returns the last run's samples, seconds and error."""
    pi, m = task.transition, task.order
    # Gibbs at matched accuracy. Its Monte-Carlo error falls like 1/sqrt(num_samples), so from a
    # pilot run predict the num_samples that reaches the tolerance, run it, and repeat (at most
    # three rounds) until the mean |Gibbs - exact| is within the tolerance.
    tolerance, burn_in = sizes["gibbs_tolerance"], sizes["gibbs_burn_in"]
    num_samples, gibbs = sizes["gibbs_start"], None
    for _ in range(4):
        generator = torch.Generator().manual_seed(11)
        weights, gibbs_s = _timed(
            lambda num_samples=num_samples, generator=generator: E.bayes_weights(
                tokens,
                pi,
                m,
                alpha=task.alpha,
                method="gibbs",
                num_samples=num_samples,
                burn_in=burn_in,
                generator=generator,
            )
        )
        error = (weights - exact).abs().mean().item()
        print(
            f"  Gibbs {num_samples:6d} samples (+{burn_in} burn-in): {gibbs_s:8.3f} s, "
            f"mean |Gibbs - exact| = {error:.2e}"
        )
        gibbs = {"num_samples": num_samples, "seconds": gibbs_s, "mean_abs_error": error}
        if error <= tolerance or num_samples >= sizes["gibbs_max"]:
            break
        num_samples = min(sizes["gibbs_max"], math.ceil(1.3 * num_samples * (error / tolerance) ** 2 / 100) * 100)
    matched = gibbs["mean_abs_error"] <= tolerance
    print(
        f"  at tolerance {tolerance:g}: Gibbs {gibbs['seconds']:.3f} s ({gibbs['num_samples']} samples"
        f"{'' if matched else ', tolerance NOT reached'}) vs exact {exact_s:.3f} s -> exact is "
        f"{gibbs['seconds'] / exact_s:.1f}x faster"
    )
    return gibbs


def bench_sampler(task: MTDTask, sizes: dict) -> dict:
    pi, m, q = task.transition, task.order, task.vocab_size
    batch, seq_len = sizes["sampler_batch"], sizes["sampler_len"]
    n_tokens = batch * seq_len
    print(f"sampler: batch {batch} x length {seq_len} ({n_tokens} tokens)")
    task.sample(8, seq_len, generator=torch.Generator().manual_seed(0))  # warm-up
    times = []
    for repeat in range(sizes["sampler_repeats"]):
        sample, seconds = _timed(
            lambda repeat=repeat: task.sample(batch, seq_len, generator=torch.Generator().manual_seed(repeat))
        )
        times.append(seconds)
    fast_s = min(times)
    rate = n_tokens / fast_s
    print(
        f"  fast sampler:         {fast_s:8.4f} s (best of {len(times)}) = {rate / 1e6:.2f}M tokens/s "
        f"(target >= 1M: {'met' if rate >= 1e6 else 'NOT met'})"
    )

    subset = sizes["sampler_naive_subset"]
    pi_np = pi.numpy()
    (naive_tokens, naive_lags, _naive_weights), naive_s = _timed(
        lambda: naive_sample(pi_np, m, task.alpha, subset, seq_len, seed=0)
    )
    naive_rate = subset * seq_len / naive_s
    ratio = rate / naive_rate
    print(f"  naive per-position:   {naive_rate / 1e3:8.1f}k tokens/s ({subset} sequences)")
    print(f"  speed-up fast/naive:  {ratio:8.1f}x  (target >= 50x: {'met' if ratio >= 50 else 'NOT met'})")

    # Agreement. The two samplers draw different random numbers, so compare (a) a deterministic
    # quantity, the true predictive, recomputed naively on the fast sampler's own sequences, and
    # (b) the statistics both samplers must reproduce: lag-conditional transitions vs pi.
    fast_tokens = sample.tokens[:subset].numpy()
    next_diff = float(
        np.abs(
            naive_next_probs(fast_tokens, sample.weights[:subset].numpy(), pi_np) - sample.next_probs[:subset].numpy()
        ).max()
    )
    fast_freq = lag_conditional_transitions(sample.tokens.numpy(), sample.lags.numpy(), m, q)
    naive_freq = lag_conditional_transitions(naive_tokens, naive_lags, m, q)
    print(f"  max |naive - fast| next_probs on the fast sampler's first {subset} sequences: {next_diff:.2e}")
    print(
        f"  max |empirical P(y_t | y_(t-z_t)) - pi|: fast {np.abs(fast_freq - pi_np).max():.4f} "
        f"({n_tokens} tokens), naive {np.abs(naive_freq - pi_np).max():.4f} ({subset * seq_len} tokens)"
    )
    return {
        "fast_seconds": fast_s,
        "tokens_per_second": rate,
        "naive_tokens_per_second": naive_rate,
        "speedup": ratio,
        "next_probs_max_abs_diff": next_diff,
    }


def main(quick: bool = False) -> dict:
    """Run both benchmarks and print their measurements and ratios."""
    sizes = QUICK if quick else FULL
    # Timings on a shared machine depend on its load: print it with the thread count.
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load average {load}; task {TASK}"
    )
    task = MTDTask(**TASK)
    return {"bayes": bench_bayes(task, sizes), "sampler": bench_sampler(task, sizes)}


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
