"""The results of Luanette's resource, prompt and completion replies, as types.

Seed 001 carries them as ``Success {result}`` with a free JSON value; these Structs pin
what that value holds (docs/protocol.md#resources), so the daemon builds its replies
from them and a client (an MCP server, say) reads them back with
``msgspec.convert(reply.result, ResourceRead)``.  They mirror MCP's result types in
snake_case.  Not Payload variants: seed 001's wire and its golden vectors are unchanged.
"""

from __future__ import annotations

import msgspec


class ResourceInfo(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True):
    """One entry of ``list_resources``: a resource (``uri``) or a family of them
    (``uri_template``, RFC 6570 level 1); exactly one of the two is set."""

    name: str
    description: str
    mime_type: str
    uri: str | None = None
    uri_template: str | None = None


class ResourceContent(msgspec.Struct, frozen=True):
    """One content of a read (JSON resources are JSON text)."""

    uri: str
    mime_type: str
    text: str


class ResourceRead(msgspec.Struct, frozen=True):
    """The result of ``read_resource`` (but of the older ``luanette://jobs/stats``)."""

    contents: list[ResourceContent]


class PromptArgument(msgspec.Struct, frozen=True):
    """One argument of a prompt."""

    name: str
    description: str
    required: bool = False


class PromptInfo(msgspec.Struct, frozen=True):
    """A prompt as ``list_prompts`` gives it."""

    name: str
    description: str
    arguments: list[PromptArgument]


class PromptList(msgspec.Struct, frozen=True):
    """The result of ``list_prompts``."""

    prompts: list[PromptInfo]


class TextContent(msgspec.Struct, frozen=True, kw_only=True):
    """The text of a prompt message."""

    type: str = "text"
    text: str


class PromptMessage(msgspec.Struct, frozen=True):
    """One message of a prompt (``role`` ``user`` or ``assistant``)."""

    role: str
    content: TextContent


class PromptResult(msgspec.Struct, frozen=True):
    """The result of ``get_prompt``."""

    description: str
    messages: list[PromptMessage]


class CompletionResult(msgspec.Struct, frozen=True):
    """The result of ``complete``: at most 100 ``values``; ``total`` matched."""

    values: list[str]
    total: int
    has_more: bool
