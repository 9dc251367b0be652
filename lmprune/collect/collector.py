"""The Collector: one collection run (one process of it under torchrun): loading, calibration,
the first pass over both corpora, the global Gram's second pass, the statistics and
manifest.json; `run` and `register`, the stage's entry points.

The top of the package: it imports the other modules of it, and none of them imports it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from lmprune import __version__
from lmprune.collect.checkpoints import Checkpoints, save_tensors
from lmprune.collect.config import CORPORA, CollectConfig, parse_fire_threshold, validate
from lmprune.collect.first_pass import FirstPass
from lmprune.collect.forward import forward_batch, stopping_hooks
from lmprune.collect.gram import SymmetricGram, gram_row_dtype
from lmprune.collect.plan import Batch, Plan, limit_tokens, tokenize
from lmprune.collect.processes import Processes
from lmprune.collect.stats import auroc_exact, auroc_from_hist, cohens_d, histogram_of, unshift
from lmprune.core.arch import NeuronMap
from lmprune.core.config import StageSpec
from lmprune.core.errors import LmpruneError
from lmprune.core.hooks import NeuronHooks
from lmprune.core.io import check_out_dir, read_json, write_json_atomic
from lmprune.core.lock import folder_lock
from lmprune.core.stats_folder import COACT_FILE, MANIFEST_FILE, STATS_FILE
from lmprune.core.stats_folder import FILES as STATS_FILES

FORMAT_VERSION = 1


def _layer_gated(nmap: NeuronMap) -> bool:
    return len(nmap.layout.inputs) > 1 or nmap.layout.fused_gate_up


class Collector:
    """One collection run (one process of it under torchrun)."""

    def __init__(self, cfg: CollectConfig):
        from lmprune.core.data import load_corpus
        from lmprune.core.models import load_model, resolve_device

        validate(cfg)
        self.cfg = cfg
        self.procs = Processes(resolve_device(cfg.device))
        device = self.procs.device or cfg.device
        self.corpora = [load_corpus(spec, cfg.max_docs) for spec in (cfg.offensive, cfg.clean)]
        self.loaded = load_model(cfg.model, cfg.dtype, device, cfg.revision, cfg.trust_remote_code)
        self.model = self.loaded.model
        self.device = next(self.model.parameters()).device
        self.nmap = NeuronMap(self.model)
        widths = self.nmap.widths
        if len(set(widths)) != 1:
            raise LmpruneError(f"layers of different widths ({sorted(set(widths))}) are not "
                               f"supported by collect")
        self.L, self.W = self.nmap.num_layers, widths[0]
        tok = self.loaded.tokenizer
        docs = [limit_tokens(tokenize(tok, c.texts, cfg.max_length), cfg.max_tokens)
                for c in self.corpora]
        for corpus, toks in zip(self.corpora, docs, strict=True):
            if not toks or any(len(t) == 0 for t in toks):
                raise LmpruneError(f"corpus '{corpus.spec}' has documents without tokens (or "
                                   f"--max-tokens keeps none)")
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.plan = Plan(docs, cfg, pad_id)
        self.fire_mode, self.fire_frac = parse_fire_threshold(cfg.fire_threshold,
                                                              _layer_gated(self.nmap))
        self.exact = [len(d) <= cfg.exact_pooled_cap for d in docs]
        self.out = Path(cfg.out)

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # --- identity of this run: a checkpoint only resumes the same run
    def _settings(self) -> dict:
        cfg = self.cfg
        keys = ("max_docs", "max_tokens", "max_length", "batch_size", "padding_side",
                "coact_token_fraction", "top_k_global", "global_max_docs", "seed",
                "exact_pooled_cap", "histogram_bins", "calibration_docs", "checkpoint_every")
        settings = {k: getattr(cfg, k) for k in keys}
        fire = "> 0" if self.fire_mode == "zero" else (
            f"|a| > {self.fire_frac} x max |a| of the neuron on the first offensive batch")
        settings.update(fire_threshold=fire, fire_threshold_spec=cfg.fire_threshold,
                        dtype=str(self._dtype()).replace("torch.", ""),
                        device=str(self.device), processes=self.procs.world)
        rows = gram_row_dtype(self._dtype(), self.device)
        if rows != torch.float32:  # a checkpoint resumes only in the precision it was summed in
            settings["gram_rows"] = str(rows).replace("torch.", "")
        return settings

    def _fingerprint(self) -> str:
        payload = {"model": self.loaded.identity, "settings": self._settings(),
                   "corpora": [c.sha256 for c in self.corpora]}
        payload["settings"].pop("device")
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    # --- forward passes
    def _forward(self, batch: Batch) -> None:
        forward_batch(self.model, batch, self.device)

    def _hooks(self, fn, layers: list[int] | None = None) -> NeuronHooks:
        return stopping_hooks(self.model, self.nmap, fn, layers)

    def _calibrate(self) -> dict[str, torch.Tensor]:
        """Per-neuron constants read from fixed documents that every process reads alike (no
        communication needed): fire threshold and shift [L, W] from the first offensive batch,
        and the histogram bin range from the first documents of each corpus."""
        threshold = torch.zeros(self.L, self.W, device=self.device)
        shift = torch.zeros(self.L, self.W, device=self.device)
        batch = self.plan.make(0, self.plan.batches(0)[0], 1.0)
        valid = batch.valid.to(self.device)

        def first_batch(layer, acts):
            tokens = acts.float().reshape(-1, self.W).index_select(0, valid)
            shift[layer] = tokens.mean(0)
            if self.fire_mode == "relative":
                threshold[layer] = tokens.abs().amax(0) * self.fire_frac

        with self._hooks(first_batch):
            self._forward(batch)
        calibration = {"threshold": threshold, "shift": shift}
        if all(self.exact):
            return calibration
        lo = torch.full((self.L, self.W), float("inf"), device=self.device)
        hi = torch.full((self.L, self.W), float("-inf"), device=self.device)
        for corpus in range(len(CORPORA)):
            n = min(self.cfg.calibration_docs, len(self.plan.docs[corpus]))
            for docs in self.plan.batches(corpus, list(range(n))):
                batch = self.plan.make(corpus, docs, 1.0)
                bias = torch.where(batch.attention_mask.bool(), 0.0, float("-inf"))
                bias = bias.unsqueeze(2).to(self.device)

                def minmax(layer, acts, bias=bias):
                    pooled = (acts.float() + bias).amax(1)  # [B, W]
                    torch.minimum(lo[layer], pooled.amin(0), out=lo[layer])
                    torch.maximum(hi[layer], pooled.amax(0), out=hi[layer])

                with self._hooks(minmax):
                    self._forward(batch)
        span = (hi - lo).clamp(min=1e-6)
        return {**calibration, "hist_lo": lo - 0.25 * span, "hist_hi": hi + 0.25 * span}

    def _rounds(self, schedule: list) -> int:
        return -(-len(schedule) // self.procs.world)

    def _progress(self, schedule, start_round: int, desc: str):
        from tqdm import tqdm

        tokens = [sum(len(self.plan.docs[c][d]) for d in docs) for c, docs in schedule]
        done = sum(tokens[: start_round * self.procs.world])
        bar = tqdm(total=sum(tokens), initial=done, unit="tok", unit_scale=True, desc=desc,
                   disable=not self.procs.main, dynamic_ncols=True)
        return bar, tokens

    # --- pass 1: both corpora
    def _pooled_files(self, create: bool) -> list[dict[str, np.ndarray] | None]:
        folder = self.out / "pooled"
        files = []
        if create and self.procs.main:
            folder.mkdir(parents=True, exist_ok=True)
        for corpus, name in enumerate(CORPORA):
            if not self.exact[corpus]:
                files.append(None)
                continue
            shape = (len(self.plan.docs[corpus]), self.L, self.W)
            paths = {kind: folder / f"{name}.{kind}.npy" for kind in ("max", "mean")}
            if create and self.procs.main:
                for path in paths.values():
                    np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
            files.append(paths)
        self.procs.barrier()
        return [None if p is None else {k: np.load(v, mmap_mode="r+") for k, v in p.items()}
                for p in files]

    def first_pass(self, resume: dict | None, ckpt: Checkpoints) -> dict[str, torch.Tensor]:
        schedule = [(c, docs) for c in range(len(CORPORA)) for docs in self.plan.batches(c)]
        start = 0
        saved = None
        if resume is not None:
            saved = ckpt.load_state(resume)
            start = resume["round"]
            calibration = {k[len("calib."):]: v for k, v in saved.items()
                           if k.startswith("calib.")}
        else:
            calibration = self._calibrate()
        acc = FirstPass(self.L, self.W, self.device, self.fire_mode, calibration,
                         self.cfg.histogram_bins, self._dtype())
        if saved is not None:
            acc.load(saved)
        pooled = self._pooled_files(create=resume is None)
        fraction = self.cfg.coact_token_fraction
        bar, tokens = self._progress(schedule, start, "collect")
        rounds = self._rounds(schedule)

        def checkpoint_state():
            calib = {f"calib.{k}": v for k, v in calibration.items()}
            return {**acc.state_for_checkpoint(), **calib}

        with self._hooks(acc.hook) as hooks:
            for rnd in range(start, rounds):
                index = rnd * self.procs.world + self.procs.rank
                if index < len(schedule):
                    corpus, docs = schedule[index]
                    batch = self.plan.make(corpus, docs, fraction)
                    acc.start(batch, self.device)
                    self._forward(batch)
                    pmax, pmean = acc.finish()
                    if pooled[corpus] is not None:
                        rows = np.asarray(docs)
                        pooled[corpus]["max"][rows] = acc.to_host("max", pmax)
                        pooled[corpus]["mean"][rows] = acc.to_host("mean", pmean)
                first = rnd * self.procs.world
                bar.update(sum(tokens[first:first + self.procs.world]))
                if (rnd + 1) % self.cfg.checkpoint_every == 0 and rnd + 1 < rounds:
                    for files in filter(None, pooled):
                        for mm in files.values():
                            mm.flush()
                    ckpt.save(f"pass1.r{rnd + 1}", checkpoint_state(),
                              {"phase": "pass1", "round": rnd + 1})
            hooks.check_fired()
        bar.close()
        for files in filter(None, pooled):
            for mm in files.values():
                mm.flush()
        state = acc.state_for_checkpoint()
        reduced = {k: self.procs.sum(v.clone()) for k, v in state.items()}
        reduced["coact.gram"] = acc.gram.full(reduced["coact.gram"])
        reduced.update({f"calib.{k}": v for k, v in calibration.items()})
        return reduced

    @staticmethod
    def effect_size(r: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cohen's d of the max-pooled values per neuron, offensive minus clean: [L, W]."""
        o, c = CORPORA
        return cohens_d(int(r[f"{o}.documents"]), r[f"{o}.pmax_sum"], r[f"{o}.pmax_sumsq"],
                        int(r[f"{c}.documents"]), r[f"{c}.pmax_sum"], r[f"{c}.pmax_sumsq"])

    # --- statistics from the reduced sums (main process)
    def statistics(self, r: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
        stats: dict[str, torch.Tensor] = {}
        k = r["calib.shift"].double()
        for c in CORPORA:
            n = r[f"{c}.tokens"].double()
            docs = r[f"{c}.documents"].double()
            mean = r[f"{c}.sum"] / n
            offset = mean - k  # mean of the shifted values
            sumsq_shifted = r[f"{c}.sumsq_shifted"]
            stats.update({
                f"{c}.tokens": r[f"{c}.tokens"], f"{c}.documents": r[f"{c}.documents"],
                f"{c}.sum": r[f"{c}.sum"],
                f"{c}.sumsq": sumsq_shifted + 2 * k * r[f"{c}.sum"] - n * k * k,
                f"{c}.mean": mean,
                f"{c}.var": (sumsq_shifted / n - offset * offset).clamp(min=0),
                f"{c}.fire_rate": r[f"{c}.fires"].double() / n,
                f"{c}.pooled_max_mean": r[f"{c}.pmax_sum"] / docs,
                f"{c}.pooled_mean_mean": r[f"{c}.pmean_sum"] / docs,
            })
        o, c = CORPORA
        stats["effect_size"] = self.effect_size(r).float()
        stats["fire_threshold"] = r["calib.threshold"].float()
        auroc_info = {"pooling": "max over a document's non-padding tokens"}
        if all(self.exact):
            pos = np.load(self.out / "pooled" / f"{o}.max.npy", mmap_mode="r")
            neg = np.load(self.out / "pooled" / f"{c}.max.npy", mmap_mode="r")
            auc = auroc_exact(pos.reshape(len(pos), -1), neg.reshape(len(neg), -1))
            stats["auroc"] = torch.from_numpy(auc).view(self.L, self.W).float()
            auroc_info["method"] = "exact (Mann-Whitney U, ties count 1/2)"
        else:
            lo, hi = r["calib.hist_lo"].cpu(), r["calib.hist_hi"].cpu()
            hists = []
            for corpus, name in enumerate(CORPORA):
                if self.exact[corpus]:
                    values = np.load(self.out / "pooled" / f"{name}.max.npy", mmap_mode="r")
                    hists.append(histogram_of(values, lo, hi, self.cfg.histogram_bins))
                else:
                    hists.append(r[f"{name}.hist"].cpu())
                stats[f"{name}.pooled_max_hist"] = hists[-1].to(torch.int32)
            auc, bound = auroc_from_hist(*hists)
            stats["auroc"] = auc.float()
            stats["auroc_error_bound"] = bound.float()
            stats["pooled_hist_lo"], stats["pooled_hist_hi"] = lo.float(), hi.float()
            auroc_info.update(
                method=f"per-neuron histograms, {self.cfg.histogram_bins} bins between "
                       f"pooled_hist_lo and pooled_hist_hi (set from the first "
                       f"{self.cfg.calibration_docs} documents of each corpus, widened by 25% "
                       f"of the range on each side; values outside fall in the end bins)",
                error_bound="|auroc - exact| <= auroc_error_bound = 0.5 * sum_b p_b q_b",
                max_error_bound=float(bound.max()))
        n = r["coact.tokens"]
        total, gram = unshift(r["coact.sum_shifted"], r["coact.gram"], k, n)
        coact = {"tokens": n, "sum": total, "gram": gram}
        return ({k: v.cpu() for k, v in stats.items()}, {k: v.cpu() for k, v in coact.items()},
                auroc_info)

    # --- pass 2: global Gram of the top-K neurons
    def _global_docs(self, corpus: int) -> list[int]:
        n = len(self.plan.docs[corpus])
        want = self.cfg.global_max_docs
        if want is None or want >= n:
            return list(range(n))
        rng = np.random.default_rng([self.cfg.seed, 1 << 20, corpus])
        return sorted(rng.choice(n, size=want, replace=False).tolist())

    def candidates(self, effect_size: torch.Tensor) -> torch.Tensor:
        """(layer, neuron) [K, 2] of the top-K |effect size| neurons, in (layer, neuron) order."""
        k = min(self.cfg.top_k_global, self.L * self.W)
        order = torch.argsort(effect_size.abs().flatten(), descending=True, stable=True)[:k]
        order = order.sort().values
        return torch.stack([order // self.W, order % self.W], dim=1)

    def second_pass(self, index: torch.Tensor, shift: torch.Tensor, resume: dict | None,
                    ckpt: Checkpoints) -> dict[str, torch.Tensor]:
        """Gram matrix of the candidates `index` [K, 2] across layers (around `shift` [L, W])."""
        K = index.shape[0]
        shift = shift.to(self.device)
        layers = sorted(set(index[:, 0].tolist()))
        columns = {layer: index[index[:, 0] == layer, 1].to(self.device) for layer in layers}
        offsets, at = {}, 0
        for layer in layers:
            offsets[layer] = at
            at += columns[layer].numel()
        schedule = [(c, docs) for c in range(len(CORPORA))
                    for docs in self.plan.batches(c, self._global_docs(c))]
        gram = SymmetricGram(1, K, self.device)
        total = torch.zeros(K, dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.int64, device=self.device)
        start = 0
        if resume is not None and resume["round"] > 0:
            saved = ckpt.load_state(resume)
            gram.total.copy_(saved["gram"])
            total.copy_(saved["sum"])
            count.copy_(saved["tokens"])
            start = resume["round"]
        buf = {}

        def hook(layer, acts):
            tokens = acts.float().reshape(-1, self.W).index_select(0, buf["valid"])
            cols = columns[layer]
            buf["x"][:, offsets[layer]:offsets[layer] + cols.numel()] = (
                tokens[:, cols] - shift[layer, cols])

        bar, tokens = self._progress(schedule, start, "global gram")
        rounds = self._rounds(schedule)
        with self._hooks(hook, layers) as hooks:
            for rnd in range(start, rounds):
                i = rnd * self.procs.world + self.procs.rank
                if i < len(schedule):
                    batch = self.plan.make(*schedule[i], 1.0)
                    buf["valid"] = batch.valid.to(self.device)
                    buf["x"] = torch.empty(batch.tokens, K, device=self.device)
                    self._forward(batch)
                    gram.add(buf["x"].unsqueeze(0))
                    total += buf["x"].sum(0)
                    count += batch.tokens
                first = rnd * self.procs.world
                bar.update(sum(tokens[first:first + self.procs.world]))
                if (rnd + 1) % self.cfg.checkpoint_every == 0 and rnd + 1 < rounds:
                    gram.flush()
                    ckpt.save(f"pass2.r{rnd + 1}",
                              {"gram": gram.total, "sum": total, "tokens": count},
                              {"phase": "pass2", "round": rnd + 1})
            hooks.check_fired()
        bar.close()
        gram.flush()
        n = self.procs.sum(count.clone())
        raw_sum, raw_gram = unshift(self.procs.sum(total.clone()),
                                    gram.full(self.procs.sum(gram.total.clone()))[0],
                                    shift[index[:, 0], index[:, 1]], n)
        return {"global.index": index, "global.sum": raw_sum.cpu(), "global.gram": raw_gram.cpu(),
                "global.tokens": n.cpu()}

    # --- everything
    def run(self) -> int:
        cfg, procs = self.cfg, self.procs
        fingerprint = self._fingerprint()
        manifest_path = self.out / MANIFEST_FILE
        if procs.main and not cfg.resume and self.out.exists():
            for name in STATS_FILES:
                (self.out / name).unlink(missing_ok=True)
            shutil.rmtree(self.out / ".checkpoint", ignore_errors=True)
            shutil.rmtree(self.out / "pooled", ignore_errors=True)
        procs.barrier()
        if manifest_path.is_file():
            manifest = read_json(manifest_path, "pass --no-resume to collect again")
            if manifest.get("fingerprint") == fingerprint and manifest.get("complete"):
                if procs.main:
                    print(f"lmprune collect: {self.out} is complete already (same settings)")
                procs.close()
                return 0
            raise LmpruneError(f"{self.out} holds statistics of another run; choose another "
                               f"--out or pass --no-resume to overwrite them")
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt = Checkpoints(self.out, procs, fingerprint)
        resume = ckpt.read() if cfg.resume else None
        started = time.perf_counter()

        pass1_file = ckpt.dir / "pass1.safetensors"
        if resume is not None and resume["phase"] != "pass1":
            reduced = load_file(pass1_file)
        else:
            reduced = self.first_pass(resume, ckpt)
            resume = None
        tokens_pass1 = sum(int(reduced[f"{c}.tokens"]) for c in CORPORA)
        elapsed_pass1 = time.perf_counter() - started
        index = torch.zeros(0, 2, dtype=torch.int64)
        if cfg.top_k_global:  # every process picks them; the main process's choice wins
            index = self.candidates(self.effect_size(reduced).cpu())
            index = procs.broadcast(index.to(self.device)).cpu()
        if resume is None:  # pass 1 just ended: make its reduced sums durable first
            ckpt.dir.mkdir(parents=True, exist_ok=True)
            if procs.main:
                save_tensors(pass1_file, reduced)
            ckpt.save("pass2.r0", {}, {"phase": "pass2", "round": 0})
            resume = {"phase": "pass2", "round": 0, "tag": "pass2.r0"}
        coact = {}
        if cfg.top_k_global:
            coact = self.second_pass(index, reduced["calib.shift"], resume, ckpt)
        if procs.main:
            stats, layer_coact, auroc_info = self.statistics(reduced)
            coact.update(layer_coact)
            save_tensors(self.out / STATS_FILE, stats)
            save_tensors(self.out / COACT_FILE, coact)
            manifest = self._manifest(stats, coact, auroc_info, fingerprint, tokens_pass1,
                                      elapsed_pass1)
            write_json_atomic(manifest_path, manifest)
            shutil.rmtree(ckpt.dir, ignore_errors=True)
            print(f"lmprune collect: wrote {self.out} ({tokens_pass1:,} tokens, "
                  f"{tokens_pass1 / max(elapsed_pass1, 1e-9):,.0f} tok/s)")
        procs.barrier()
        procs.close()
        return 0

    def _manifest(self, stats, coact, auroc_info, fingerprint, tokens, elapsed) -> dict:
        cfg = self.cfg
        corpora = {}
        for corpus, name in enumerate(CORPORA):
            info = self.corpora[corpus].describe()
            info.update(documents=int(stats[f"{name}.documents"]),
                        tokens=int(stats[f"{name}.tokens"]))
            if self.exact[corpus]:
                info["pooled"] = {"mode": "exact", "max": f"pooled/{name}.max.npy",
                                  "mean": f"pooled/{name}.mean.npy",
                                  "shape": [info["documents"], self.L, self.W],
                                  "rows": "documents in corpus order"}
            else:
                info["pooled"] = {"mode": "histogram", "key": f"{name}.pooled_max_hist"}
            corpora[name] = info
        rows = str(gram_row_dtype(self._dtype(), self.device)).replace("torch.", "")
        coactivation = {
            "tokens": int(coact["tokens"]),
            "sampling": f"each non-padding token with probability {cfg.coact_token_fraction}, "
                        f"drawn per document by lmprune.collect.coact_token_mask(seed={cfg.seed},"
                        f" corpus index (offensive 0, clean 1), document index, length): "
                        f"independent of batching, padding and processes; both corpora",
            "products": f"rows centred by a per-neuron shift, kept in {rows}, multiplied with "
                        f"float32 sums, added to float64 every few batches",
        }
        if cfg.top_k_global:
            chosen = [self._global_docs(c) for c in range(len(CORPORA))]
            docs = [len(c) for c in chosen]
            coactivation["global"] = {
                "k": int(coact["global.index"].shape[0]), "tokens": int(coact["global.tokens"]),
                "candidates": "top-K |effect_size| over all layers (ties: lower index first)",
                "sampling": f"second pass over {docs[0]} offensive and {docs[1]} clean documents "
                            f"(seeded choice, seed {cfg.seed}; all if the corpus is smaller), "
                            f"every non-padding token",
                "documents": dict(zip(CORPORA, chosen, strict=True)),
            }
        return {
            "format": "lmprune.stats", "format_version": FORMAT_VERSION,
            "lmprune_version": __version__,
            "model": self.loaded.identity,
            "num_layers": self.L, "neurons_per_layer": self.W,
            "hook_points": self.nmap.hook_points,
            "corpora": corpora,
            "settings": self._settings(),
            "coactivation": coactivation,
            "auroc": auroc_info,
            "throughput": {"first_pass_tokens": tokens, "first_pass_seconds": round(elapsed, 3),
                           "tokens_per_second": round(tokens / max(elapsed, 1e-9), 1)},
            "config": asdict(cfg),
            "fingerprint": fingerprint,
            "complete": True,
        }


def run(cfg: CollectConfig) -> int:
    check_out_dir(cfg.out, "stats", cfg.overwrite)
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun the first process writes
    with folder_lock(cfg.out) if main else contextlib.nullcontext(), torch.inference_mode():
        return Collector(cfg).run()


STAGE = StageSpec(
    "collect", CollectConfig, run,
    help="Stream per-neuron statistics and co-activation on an offensive and a clean corpus.",
    wired=("model", "resume"),
    step=lambda cfg, resume: run(replace(cfg, resume=resume)))
register = STAGE.register
