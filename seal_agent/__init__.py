"""seal-agent: SEAL (Self-Adapting Language Models) as a long-running continual-learning service.

The package is layered; each layer imports only the layers before it
(tests/test_layers.py reads every import and fails on one that points up, or
on a cycle):

    errors, config,      what every layer may use: user-facing errors, typed config,
    progress             the progress callback long jobs report through
    documents, model/,   files -> passages; transformers/peft mechanics;
    arc/                 ARC grids, augmentations, recipes, test-time training
    engine/              what decodes: the torch model itself, or vLLM serving the same weights
    policy               policy files -> prompts and training examples
    qa/                  asking questions, grading answers, writing questions
    memory/              what is kept: the state database, adapters, versions, modules, the replay bank
    learning/            self-edits, the learners (a document -> a committed version), consolidation
    restem/              the outer loop that improves the self-edit policy
    cluster/             ReSTEM's candidates on a pool of Ray actors
    agent                the composition root: builds the pieces from a Config
    service/             the daemon: queue, inbox, schedules, serving, the HTTP API
    evaluation/          the ladder, the continual run, the benchmark
    cli/                 the command line: parses, calls the library, renders
"""

import os

__version__ = "0.1.0"

# Nothing is ever fetched from a model hub. Set here, the one place every entry
# point (CLI, daemon, a Python caller, the tests) passes before transformers,
# huggingface_hub or sentence-transformers is imported and reads it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
