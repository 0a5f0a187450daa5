-- What a flow run does after the prologue: define(), or a guard or an enter/exit handler.
if P.op == "define" then
  if type(M.define) ~= "function" then error("the module defines no define()", 0) end
  local def = M.define()
  if type(def) ~= "table" then error("define() must return a table", 0) end
  local problems = {}
  -- a handler may be given as the function itself: it is named by the module field holding it
  local function named(where, f)
    if f == nil then return nil end
    if type(f) == "function" then
      for k, v in pairs(M) do
        if v == f and type(k) == "string" then return k end
      end
      problems[#problems + 1] = where .. ": the function is not a field of the module"
      return nil
    end
    if type(f) ~= "string" or type(M[f]) ~= "function" then
      problems[#problems + 1] = where .. ": the module has no function " .. tostring(f)
    end
    return f
  end
  if type(def.states) == "table" then
    for name, st in pairs(def.states) do
      if type(st) == "table" then
        st.enter = named("states." .. tostring(name) .. ".enter", st.enter)
        st.exit = named("states." .. tostring(name) .. ".exit", st.exit)
        if type(st.guards) == "table" then
          for action, g in pairs(st.guards) do
            st.guards[action] = named("states." .. tostring(name) .. ".guards." .. tostring(action), g)
          end
        end
      end
    end
  end
  return {definition = def, problems = problems}
end
local f = M[P.handler]
if type(f) ~= "function" then error("the flow module has no function " .. tostring(P.handler), 0) end
local context, emits = P.context, {}
local ctx = {}
function ctx:current_state() return P.state end
function ctx:context() return context end
function ctx:set_context(key, value)
  if type(key) ~= "string" then error("ctx:set_context: the key must be a string", 2) end
  context[key] = value
end
function ctx:subject() return P.subject end
function ctx:current_user() return P.user end
function ctx:now() return P.now end
function ctx:emit(name, payload)
  if type(name) ~= "string" then error("ctx:emit: the event name must be a string", 2) end
  emits[#emits + 1] = {name = name, payload = payload}
end
function ctx:log(level, message)
  local fn = log[level == "warning" and "warn" or level] or log.info
  fn(tostring(message), {flow = P.flow, instance = P.instance})
end
-- the seed's Lua spellings
ctx.currentState, ctx.setContext, ctx.currentUser = ctx.current_state, ctx.set_context, ctx.current_user
local ok, reason = f(ctx, P.event)
return {ok = ok, reason = reason, context = context, emits = emits}
