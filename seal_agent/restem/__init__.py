"""ReSTEM, the outer loop that improves the self-edit policy: the domain-generic
loop and its pure decisions (`loop`: best-of-k, promotion; it touches only the
model it trains), the knowledge domain (`knowledge`), the round log
(`rounds`, the only SQL here) and a round as seal-agent runs it (`refresh`,
handed what it uses by the composition root). Imports learning/, memory/,
qa/, policy, model/ and below; never the agent."""
