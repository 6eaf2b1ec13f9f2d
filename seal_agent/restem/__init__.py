"""ReSTEM, the outer loop that improves the self-edit policy: the domain-generic
loop (`loop`, pure but for the model it trains), the knowledge domain
(`knowledge`) and a round as seal-agent runs it (`refresh`). Imports
learning/, memory/, qa/, policy, model/ and below."""
