"""Image tools of the agent: a registry of them and the host-side executor of tool calls.

``base`` holds what every tool shares (``Tool``, ``ToolConfig``, ``ToolContext`` with the
trajectory's views and their provenance, the error kinds, the ``TOOLS`` registry,
``run_tool_call`` and the schemas for the system prompt); each tool is one module with one
registered function: ``reflect`` (visual reflection) and ``confirm`` (visual confirmation, a zoom).
Adding a tool is one such module and its import line below; the import order is the order in
which the system prompt lists the tools. ``tools.reflect`` and ``tools.confirm`` are the modules.
"""

from imagent_jax.agent.tools.base import (ERROR_KINDS, MALFORMED_KINDS, TOOLS, Box, Tool, ToolConfig, ToolContext,
                                          ToolError, ToolOutput, ToolResult, ViewRef, available_tools,
                                          fit_view_size, register_tool, run_tool_call, tool_schemas)
# The tools, one module each, registered on import in this order (the system prompt's order).
from imagent_jax.agent.tools import reflect  # noqa: E402  isort: skip
from imagent_jax.agent.tools import confirm  # noqa: E402  isort: skip
from imagent_jax.agent.tools.confirm import legibility, zoom_view

__all__ = [
    "Box",
    "ERROR_KINDS",
    "MALFORMED_KINDS",
    "TOOLS",
    "Tool",
    "ToolConfig",
    "ToolContext",
    "ToolError",
    "ToolOutput",
    "ToolResult",
    "ViewRef",
    "available_tools",
    "fit_view_size",
    "legibility",
    "register_tool",
    "run_tool_call",
    "tool_schemas",
    "zoom_view",
]
