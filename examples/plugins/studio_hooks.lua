-- Seed 004's hooks example for Luanette: a before hook that validates and rewrites a
-- job's params, an after hook that only logs, and a pattern-matched tool hook that
-- reports every orpheus generation as a custom event. Load it with --plugins DIR or
-- store it (its describe() tags it "plugin") and `luanette-cli plugin load HASH`.
-- Plugin code keeps no state between events: every handler runs in a fresh sandbox.

local Plugin = {}

function Plugin.describe()
  return {
    name = "studio_hooks",
    description = "Refuses oversized generations, stamps jobs, reports orpheus results",
    tags = { "plugin" },
    capabilities = {},            -- handlers call no namespace: they need nothing
  }
end

--- Plugin initialisation: runs at load, and again before every handler run
function Plugin.init(ctx)
  ctx:on("job:before_execute", Plugin.onBeforeExecute, { priority = ctx.priority.EARLY })
  ctx:on("job:completed", Plugin.onCompleted, { priority = ctx.priority.NORMAL })
  ctx:on("tool:after", Plugin.onToolResult, { pattern = "orpheus.*" })
end

--- Before hook: may cancel or modify the job's params
function Plugin.onBeforeExecute(event, ctx)
  local params = event.payload
  if type(params) ~= "table" then
    return { type = "continue" }
  end
  -- validation: cancel
  if params.max_tokens and params.max_tokens > 4096 then
    return { type = "cancel", reason = "max_tokens above 4096 is not allowed in this studio" }
  end
  -- modification: stamp the params with when the job was asked for
  params.requested_at = ctx:now()
  return { type = "continue_modified", payload = params }
end

--- After hook: a notification only
function Plugin.onCompleted(event, ctx)
  ctx:log("info", "completed: " .. tostring(event.subject) .. " (" .. event.job_id .. ")")
  return { type = "continue" }
end

--- Pattern-matched tool hook
function Plugin.onToolResult(event, ctx)
  local variations = (event.result and event.result.variations) or {}
  ctx:emit("custom:generation_completed", { tool = event.name, count = #variations })
  return { type = "continue" }
end

return Plugin
