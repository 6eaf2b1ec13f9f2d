"""Learning a document: the self-edit a policy writes for a passage
(`self_edit`) and the learner that turns a document into committed versions
(`learner`: write, train, check, commit). Imports memory/, qa/, policy,
model/, documents, config and errors."""
