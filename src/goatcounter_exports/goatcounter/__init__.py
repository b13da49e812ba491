"""GoatCounter knowledge, kept apart from the generic runtime and adapters; app.py wires it in.

profile      the request path (input rules, the create body per version, the budget)  -> runtime Extension
versions     which create body a server wants, learnt at no cost to the export budget
budget       the hourly export budget, guarded; store: where it and our exports are remembered
exports      the export operations and the Export object
exportfile   the one reader of export files: status, verified bytes, records, pages
workflow     the export job: create or reuse, wait; write a file atomically
sync         the incremental copy into SQLite; stats: bounded questions over it
tools        every GoatCounter MCP tool                                              -> MCP adapter hooks
rest         the download route, through the reader                                 -> REST adapter hooks
openapi      the answers the export operations really give                          -> OpenAPI hooks
"""
