-- What a plugin run does after the prologue: init(ctx), a handler, or cleanup(ctx).
local subs, offs, emits, handlers, n, quiet = {}, {}, {}, {}, 0, false
local ctx = {priority = {FIRST = -100, EARLY = -50, NORMAL = 0, LATE = 50, LAST = 100}, plugin = P.plugin}
function ctx:on(event, handler, config)
  if type(event) ~= "string" or event == "" then error("ctx:on: the event must be a non-empty string", 2) end
  if type(handler) ~= "function" then error("ctx:on: the handler must be a function", 2) end
  config = config or {}
  if type(config) ~= "table" then error("ctx:on: the config must be a table", 2) end
  local priority = config.priority or 0
  if math.type(priority) ~= "integer" or priority < -100 or priority > 100 then
    error("ctx:on: priority must be an integer from -100 (FIRST) to 100 (LAST)", 2)
  end
  if config.pattern ~= nil and type(config.pattern) ~= "string" then error("ctx:on: pattern must be a string", 2) end
  n = n + 1
  handlers[n] = handler
  local name
  for k, v in pairs(M) do
    if v == handler and type(k) == "string" then name = k break end
  end
  local id = P.plugin .. "#" .. n
  subs[#subs + 1] = {id = id, index = n, event = event, priority = priority, pattern = config.pattern,
                     once = config.once and true or false, handler = name}
  return id
end
function ctx:off(id) offs[#offs + 1] = tostring(id) end
function ctx:emit(name, payload)
  if type(name) ~= "string" then error("ctx:emit: the event name must be a string", 2) end
  emits[#emits + 1] = {name = name, payload = payload}
end
function ctx:now() return P.now end
function ctx:log(level, message)
  if quiet then return end
  local f = log[level == "warning" and "warn" or level] or log.info
  f(tostring(message), {plugin = P.plugin})
end
if P.op == "cleanup" then
  if type(M.cleanup) == "function" then M.cleanup(ctx) end
  return {emits = emits}
end
if type(M.init) ~= "function" then error("the plugin defines no init(ctx)", 0) end
quiet = P.op == "deliver"
M.init(ctx)
if P.op == "init" then return {subscriptions = subs, offs = offs, emits = emits} end
quiet, offs, emits = false, {}, {}
local handler = handlers[P.index]
if handler == nil then error("init(ctx) no longer makes subscription " .. P.index, 0) end
return {result = handler(P.event, ctx), offs = offs, emits = emits}
