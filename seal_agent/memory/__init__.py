"""What seal-agent keeps, on disk and in SQLite: the state database (`state`, the
only SQL of versions, documents and events), who owns the state directory
(`lock`), the adapter log (`adapter_log`), the live model rebuilt from it
(`live`), the self-edit policy's versions (`policy_versions`), the replay QA
bank with its FAISS index and embeddings (`replay`, `embedding`), the pure
forgetting check (`forgetting`), the knowledge modules and their router
(`modules`, their rows and keys the only SQL of modules) and what a version
knows, asked through the router (`knowledge`). Imports qa/, policy, model/, documents,
config and errors."""
