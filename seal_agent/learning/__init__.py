"""Learning a document: the self-edit a policy writes for a passage
(`self_edit`), the learners that turn a document into committed versions
(`learner`, the merge line: write, train, check, commit; `modules`, a
knowledge module per document) and consolidation of the modules into the
weights (`consolidation`). Imports memory/, qa/, policy,
model/, documents, config and errors."""
