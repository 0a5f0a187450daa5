-- Seed 004's generation pipeline (section 4.3), rewritten for Luanette: instead of a
-- research assistant over notes, a sketch assistant over music.  The LLM plans the
-- sections of a piece; Orpheus generates one sketch per section, all at once (a
-- parallel_on fan-out); the classifier picks the most human-sounding; the LLM describes
-- it, its answer streamed chunk by chunk to on_chunk and out on PUB as
-- generation_chunk broadcasts.  Run it as a job: luanette-cli run HASH --wait
-- (docs/plugins.md, "Pipelines").

function describe()
  return {
    name = "generation_pipeline",
    description = "Plan sections with the LLM, sketch each with Orpheus in parallel, keep the best, describe it",
    params = {
      mood = { type = "string", default = "a slow river at dusk" },
      sections = { type = "integer", default = 3, description = "how many sketches (1..8)" },
    },
    capabilities = { "model:llm", "model:orpheus" },
    returns = "{best = hash, sketches = {hash, ...}, description, tokens, tokens_estimated, chunks}",
  }
end

-- The seed's onChunk: a GenerationContext carries state between chunks of the run.
local function on_chunk(chunk, ctx, is_final)
  if chunk:find("```", 1, true) then ctx:set("in_code_block", not ctx:get("in_code_block")) end
  ctx:set("chunks", (ctx:get("chunks") or 0) + 1)
  if is_final then log.debug("streamed", { step = ctx:current_step(), chunks = ctx:get("chunks") }) end
end

-- The seed's define(): the pipeline as data (functions are the script's own).
local function define(sections)
  return {
    id = "sketch_pipeline",
    context = {
      system = "You are a composer's assistant. Answer briefly.",
      sources = {
        { type = "static_text", name = "brief", content = "The piece is about ${mood}." },
      },
      maxTokens = 2000,
      priorities = { system = 100, brief = 90 },
    },
    strategy = {
      type = "chain",
      steps = {
        {
          id = "plan",
          prompt = "Name ${sections} sections for a short piece about ${mood}, one word each.",
          -- the plan's words become the list the next step fans out over
          parse = function(text)
            local names = {}
            for word in text:gmatch("%a+") do
              if #names < sections and #word > 3 then names[#names + 1] = word:lower() end
            end
            while #names < sections do names[#names + 1] = "section" .. (#names + 1) end
            return { sections = names }
          end,
        },
        {
          id = "sketch",
          kind = "orpheus",
          task = "generate",
          parallelOn = "plan.sections",
          params = { max_tokens = 96, random_seed = "${index}", tags = { "${item}" } },
          merge = { type = "pick_best", criteria = "classifier" },
        },
        {
          id = "describe",
          prompt = "In two sentences, describe the sketch ${sketch.result} for ${mood}.",
          dependsOn = { "sketch" },
        },
      },
    },
    streaming = { enabled = true, chunkHandler = on_chunk, bufferSize = 8 },
  }
end

function main(p)
  local sections = math.max(1, math.min(8, p.sections))
  pipeline.register(define(sections))
  local r = pipeline.run("sketch_pipeline", { mood = p.mood, sections = tostring(sections) })
  return {
    best = r.steps.sketch.result,
    sketches = r.steps.sketch.results,
    scores = r.steps.sketch.merge.scores,
    description = r.final_result,
    tokens = r.total_tokens_used,
    tokens_estimated = r.tokens_estimated,
    chunks = r.chunks,
    order = r.order,
  }
end
