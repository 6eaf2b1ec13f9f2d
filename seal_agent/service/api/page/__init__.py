"""The daemon's web page: what the model knows, at a glance (GET / on the API's
address). Server-rendered HTML (`templates/`) with a small script and style
sheet served by the daemon itself (`static/`; nothing from a CDN), read from
the state database (`views`), charts drawn here by matplotlib (`charts`);
every change it makes goes through the API's own routes (`routes`)."""
