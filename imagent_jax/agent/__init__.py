"""The agent's host side: chat protocol (prompts, parsing turns, tool responses) and image tools."""

from imagent_jax.agent.protocol import (ToolCall, Turn, build_prompt_messages, observation_suffix,
                                        parse_turn, render_tool_call, system_prompt,
                                        tool_response_message, tool_response_text)
from imagent_jax.agent.tools import (ERROR_KINDS, TOOLS, ToolConfig, ToolContext, ToolError, ToolOutput,
                                     ToolResult, ViewRef, available_tools, register_tool, run_tool_call,
                                     tool_schemas)

__all__ = [
    "ERROR_KINDS",
    "TOOLS",
    "ToolCall",
    "ToolConfig",
    "ToolContext",
    "ToolError",
    "ToolOutput",
    "ToolResult",
    "Turn",
    "ViewRef",
    "available_tools",
    "build_prompt_messages",
    "observation_suffix",
    "parse_turn",
    "register_tool",
    "render_tool_call",
    "run_tool_call",
    "system_prompt",
    "tool_response_message",
    "tool_response_text",
    "tool_schemas",
]
