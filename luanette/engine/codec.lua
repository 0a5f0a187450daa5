local type, next, rawget, rawequal, select, error = type, next, rawget, rawequal, select, error
local setmetatable, getmetatable, tostring = setmetatable, debug.getmetatable, tostring
local mtype, huge = math.type, math.huge
local spack, sunpack, byte, sub, format = string.pack, string.unpack, string.byte, string.sub, string.format
local match, utf8len, concat = string.match, utf8.len, table.concat

-- MAX_DEPTH, the nesting limit (hooteproto.depth.MAX_DEPTH, 128): luanette.luaconv puts
-- `local MAX_DEPTH = 128` before this chunk.  A table nested deeper is refused.
-- Marks a table as a JSON array; protected so scripts can neither read nor change it.
local ARRAY = {__metatable = false}
-- The null sentinel: a unique, read-only table.
local NULL = setmetatable({}, {
  __metatable = false,
  __tostring = function() return "null" end,
  __newindex = function() error("null is read-only", 2) end,
})
-- Metatable of the error values the encoder raises, so callers can tell them from
-- kills and memory errors.
local FAILURE = {}

local function path_text(root, keys, depth)
  local parts = {root}
  for i = 1, depth do
    local key = keys[i]
    if type(key) == "string" and match(key, "^[%a_][%w_]*$") then
      parts[i + 1] = "." .. key
    elseif type(key) == "string" then
      parts[i + 1] = format("[%q]", key)
    else
      parts[i + 1] = "[" .. tostring(key) .. "]"
    end
  end
  return concat(parts)
end

-- An encoder for one value tree.  `verb` completes "only ... can be <verb>";
-- `binary_ok` lets non-UTF-8 strings through as MessagePack bin.
local function new_encoder(root, verb, binary_ok)
  local out, n = {}, 0
  local keys, depth = {}, 0
  local active = {}  -- tables on the current path, to detect cycles
  local value

  local function put(bytes) n = n + 1; out[n] = bytes end

  local function fail(problem)
    error(setmetatable({path_text(root, keys, depth) .. " " .. problem}, FAILURE), 0)
  end

  local function child(key, v)
    depth = depth + 1
    keys[depth] = key
    value(v)
    depth = depth - 1
  end

  local function number(v)
    if mtype(v) == "integer" then return put(spack(">Bj", 0xd3, v)) end
    if v ~= v then fail("is NaN, which JSON cannot represent") end
    if v == huge or v == -huge then fail("is infinite, which JSON cannot represent") end
    put(spack(">Bd", 0xcb, v))
  end

  local function string_value(v)
    if utf8len(v) then return put(spack(">Bs4", 0xdb, v)) end
    if binary_ok then return put(spack(">Bs4", 0xc6, v)) end
    fail("is not valid UTF-8 text")
  end

  local function key_text(t, k)
    local kind = type(k)
    if kind == "string" then
      if utf8len(k) then return k end
      fail("has a key that is not valid UTF-8 text")
    elseif kind == "number" then
      if k == huge or k == -huge then fail("has an infinite number as a key") end
      local text = mtype(k) == "integer" and format("%d", k) or format("%.14g", k)
      if rawget(t, text) ~= nil then
        fail(format("has both the number key %s and the string key %q", text, text))
      end
      return text
    end
    fail("has a " .. kind .. " as a key; only string and number keys can be " .. verb)
  end

  -- Count the keys; `max` is the largest key if all keys are positive integers.
  local function shape(t)
    local count, max, sequence = 0, 0, true
    for k in next, t do
      count = count + 1
      if sequence and mtype(k) == "integer" and k > 0 then
        if k > max then max = k end
      else
        sequence = false
      end
    end
    return count, sequence and max or nil
  end

  local function table_value(t)
    if active[t] then fail("contains itself (a cycle); only trees of tables can be " .. verb) end
    if depth >= MAX_DEPTH then fail(format("is nested deeper than %d levels", MAX_DEPTH)) end
    local count, max = shape(t)
    local marked = getmetatable(t) == ARRAY
    if marked and not max then fail("is marked as an array but has keys other than 1, 2, 3, ...") end
    active[t] = true
    if marked or (max and max == count and count > 0) then
      put(spack(">BI4", 0xdd, max))
      for i = 1, max do child(i, rawget(t, i)) end
    else
      put(spack(">BI4", 0xdf, count))
      for k, v in next, t do
        put(spack(">Bs4", 0xdb, key_text(t, k)))
        child(k, v)
      end
    end
    active[t] = nil
  end

  value = function(v)
    local kind = type(v)
    if kind == "nil" or rawequal(v, NULL) then put("\xc0")
    elseif kind == "boolean" then put(v and "\xc3" or "\xc2")
    elseif kind == "number" then number(v)
    elseif kind == "string" then string_value(v)
    elseif kind == "table" then table_value(v)
    else fail("is a " .. kind .. "; only tables, strings, numbers, booleans and nil can be " .. verb)
    end
  end

  return function(v) value(v); return concat(out, "", 1, n) end
end

local codec = {ARRAY = ARRAY, NULL = NULL}

-- MessagePack bytes for one value; raises a failure (see codec.failure) naming the path.
function codec.encode(v, root, verb, binary_ok)
  return new_encoder(root, verb, binary_ok)(v)
end

-- MessagePack array of all arguments (nils included); binary strings allowed.
function codec.encode_args(verb, ...)
  local n = select("#", ...)
  local parts = {spack(">BI4", 0xdd, n)}
  for i = 1, n do
    parts[i + 1] = new_encoder("argument #" .. i, verb, true)((select(i, ...)))
  end
  return concat(parts)
end

-- The message of an encoder failure, or nil for any other error value.
function codec.failure(err)
  if type(err) == "table" and getmetatable(err) == FAILURE then return err[1] end
  return nil
end

-- unpack formats of the fixed-layout scalar types
local SCALARS = {
  [0xca] = ">f", [0xcb] = ">d",
  [0xcc] = ">B", [0xcd] = ">I2", [0xce] = ">I4", [0xcf] = ">I8",
  [0xd0] = ">b", [0xd1] = ">i2", [0xd2] = ">i4", [0xd3] = ">i8",
  [0xd9] = ">s1", [0xda] = ">s2", [0xdb] = ">s4",
  [0xc4] = ">s1", [0xc5] = ">s2", [0xc6] = ">s4",
}
local ARRAYS = {[0xdc] = ">I2", [0xdd] = ">I4"}
local MAPS = {[0xde] = ">I2", [0xdf] = ">I4"}

-- A Lua value for MessagePack bytes from luaconv.to_lua.  Top-level nil stays nil;
-- nil inside a container becomes NULL so the key or slot survives.
function codec.decode(s)
  local pos = 1
  local item

  local function list(count)
    local t = setmetatable({}, ARRAY)
    for i = 1, count do t[i] = item() end
    return t
  end

  local function map(count)
    local t = {}
    for _ = 1, count do
      local k = item()
      if rawequal(k, NULL) then error("a map key is nil", 0) end
      t[k] = item()
    end
    return t
  end

  item = function()
    local b = byte(s, pos)
    pos = pos + 1
    if b < 0x80 then return b end
    if b >= 0xe0 then return b - 0x100 end
    if b >= 0xa0 and b < 0xc0 then
      local text = sub(s, pos, pos + b - 0xa1)
      pos = pos + b - 0xa0
      return text
    end
    if b >= 0x90 and b < 0xa0 then return list(b - 0x90) end
    if b < 0x90 then return map(b - 0x80) end
    if b == 0xc0 then return NULL end
    if b == 0xc2 or b == 0xc3 then return b == 0xc3 end
    local fmt = SCALARS[b]
    if fmt then
      local v
      v, pos = sunpack(fmt, s, pos)
      if b == 0xcf and v < 0 then v = v + 18446744073709551616.0 end  -- uint64 above 2^63
      return v
    end
    if ARRAYS[b] or MAPS[b] then
      local count
      count, pos = sunpack(ARRAYS[b] or MAPS[b], s, pos)
      return (ARRAYS[b] and list or map)(count)
    end
    if b == 0xc7 and byte(s, pos) == 0 and byte(s, pos + 1) == 1 then
      pos = pos + 2
      return NULL
    end
    error(format("unsupported MessagePack type 0x%02x", b), 0)
  end

  if byte(s, 1) == 0xc0 then return nil end
  return item()
end

return codec
