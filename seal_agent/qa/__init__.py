"""Questions: asking a model questions with nothing in context (`answering`),
grading its answers offline or by an LLM judge (`grading`), and writing
questions about a passage for the replay bank (`writing`). Imports model/,
policy, documents, config and errors."""
