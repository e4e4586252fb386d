std = "lua54"
max_line_length = 120
files["tests/**/*_spec.lua"] = { std = "+busted" }
files["tests/busted.lua"] = { globals = { "arg" } }
files["lua/clawlua/cli.lua"] = { globals = { "arg" } }
exclude_files = { "build*/**" }
-- `local _x <close> = ...` exists for its __close: an unused variable on purpose.
ignore = { "211/_.*" }
