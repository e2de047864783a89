"""Safety shields an agent's turn passes messages through (the `Shield` protocol of
`corral.agents.protocols`): llama_guard, prompt_guard and code_guard."""
