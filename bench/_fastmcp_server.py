"""fastmcp's generic OpenAPI-to-MCP bridge (`FastMCP.from_openapi`) over GoatCounter's three export operations.

The baseline of bench/speed.py's MCP rows. It runs in a virtual environment of its own (fastmcp is not one of the
project's dependencies), so it imports nothing from the project:

    python bench/_fastmcp_server.py --upstream http://127.0.0.1:PORT --port PORT

It describes GoatCounter's API the way a user of the bridge would (OpenAPI 3.0: create, get, download, bearer
authentication), (fastmcp spells the tools' names with `_`: get_export_info), and serves them over streamable HTTP at
/mcp with fastmcp's defaults. It prints `READY <port>` when it listens, and exits when its parent dies.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
from typing import Any

EXPORT = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "site_id": {"type": "integer"},
        "start_from_hit_id": {"type": "integer"},
        "last_hit_id": {"type": "integer", "nullable": True},
        "path": {"type": "string"},
        "created_at": {"type": "string"},
        "finished_at": {"type": "string", "nullable": True},
        "num_rows": {"type": "integer", "nullable": True},
        "size": {"type": "string"},
        "hash": {"type": "string", "nullable": True},
        "error": {"type": "string", "nullable": True},
    },
}
ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}]


def openapi(upstream: str) -> dict[str, Any]:
    def answer(description: str, media: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {"description": description, "content": {media: {"schema": schema}}}

    export = {"$ref": "#/components/schemas/Export"}
    return {
        "openapi": "3.0.3",
        "info": {"title": "GoatCounter", "version": "2.7.0"},
        "servers": [{"url": upstream.rstrip("/") + "/api/v0"}],
        "security": [{"bearer": []}],
        "paths": {
            "/export": {
                "post": {
                    "operationId": "create-csv-export",
                    "summary": "Start a CSV export of the pageviews after a hit id",
                    "requestBody": {
                        "content": {
                            "application/json": {
                                "schema": {"type": "object", "properties": {"start_from_hit_id": {"type": "integer"}}}
                            }
                        }
                    },
                    "responses": {"202": answer("The export, running", "application/json", export)},
                }
            },
            "/export/{id}": {
                "get": {
                    "operationId": "get-export-info",
                    "summary": "An export's status",
                    "parameters": ID,
                    "responses": {"200": answer("The export", "application/json", export)},
                }
            },
            "/export/{id}/download": {
                "get": {
                    "operationId": "download-export",
                    "summary": "Download a finished export (CSV, gzip-compressed)",
                    "parameters": ID,
                    "responses": {
                        "200": answer("The file", "application/gzip", {"type": "string", "format": "binary"})
                    },
                }
            },
        },
        "components": {
            "schemas": {"Export": EXPORT},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", default="bench-key")
    args = parser.parse_args()
    with_parent = ctypes.CDLL(None, use_errno=True)
    with_parent.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: gone with the driver
    os.environ.setdefault("FASTMCP_SHOW_SERVER_BANNER", "false")

    import httpx2
    from fastmcp import FastMCP

    client = httpx2.AsyncClient(
        base_url=args.upstream.rstrip("/") + "/api/v0",
        headers={"Authorization": f"Bearer {args.key}", "Content-Type": "application/json"},
        timeout=30,
    )
    server = FastMCP.from_openapi(openapi(args.upstream), client=client, name="goatcounter-openapi")
    print(f"READY {args.port}", flush=True)
    server.run(transport="http", host="127.0.0.1", port=args.port, show_banner=False, log_level="warning")


if __name__ == "__main__":
    sys.exit(main())
