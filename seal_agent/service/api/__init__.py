"""The HTTP API, over a serving backend (`..serving`): what a request must pass
first (`guard`), what goes over the wire (`protocol`: request bodies, answer
shapes, errors), chat and text completions (`completions`), and the routes,
each a translation of HTTP to one call (`app`). Never imports the daemon."""
