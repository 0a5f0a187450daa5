"""A tiny CPU LitServe server with LitServe's OpenAI spec: it streams its answer
("echo: <last user message>") word by word, as a real OpenAI-compatible model server
does.  ``python tests/litserve_echo.py PORT``; used by tests/test_pipelines.py."""

from __future__ import annotations

import sys

import litserve as ls
import litserve.server
from litserve.specs.openai import OpenAISpec

# LitServe 0.2.19 turns its MCP endpoint on when the `mcp` package is installed (the
# daemon depends on it) but only imports the MCP server class when `fastmcp` is: it
# then fails at start-up.  This server needs no MCP.
litserve.server._MCP_AVAILABLE = False


class Echo(ls.LitAPI):
    def setup(self, device: str) -> None:
        pass

    def predict(self, request, context=None, **kwargs):
        # the OpenAI spec hands over the parsed ChatCompletionRequest
        for word in f"echo: {request.messages[-1].content}".split(" "):
            yield word + " "


if __name__ == "__main__":
    api = Echo(spec=OpenAISpec())
    ls.LitServer(api, accelerator="cpu", workers_per_device=1).run(port=int(sys.argv[1]), generate_client_file=False)
