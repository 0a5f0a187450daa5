-- The smallest useful job: a describe() for the index and a main(params).
function describe()
  return {
    name = "hello",
    description = "Greets someone; the first script to try",
    params = { name = { type = "string", default = "world", description = "who to greet" } },
    returns = "a greeting",
  }
end

function main(params)
  log.info("saying hello", { name = params.name })
  return "hello, " .. params.name
end
