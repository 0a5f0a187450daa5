-- Tracing a script: annotate the job's span, time the model call, record a metric.
-- The daemon already made the span (luanette.script.execute, a child of the request that
-- queued the job); every model call below is a child span, and the model service gets
-- its traceparent. Export with `luanette serve --otlp-endpoint http://collector:4318`.
function describe()
  return {
    name = "otel_example",
    description = "Generate a phrase with orpheus and trace what happened",
    params = {
      temperature = { type = "number", default = 1.0 },
      keep_pitch_min = { type = "integer", default = 0 },
    },
    returns = "{hash, notes, kept, trace_id, traceparent}",
  }
end

function main(p)
  otel.set_attribute("music.temperature", p.temperature)
  otel.event("generate.start", { model = "orpheus" })

  local started = os.clock()
  local out = orpheus.generate { temperature = p.temperature, max_tokens = 128 }
  local hash = out.variations[1].hash
  otel.event("generate.done", { hash = hash })

  -- keep the notes at or above keep_pitch_min; a Lua predicate decides per event
  local kept = midi.filter(hash, function(event)
    return event.note == nil or event.note >= p.keep_pitch_min
  end)
  local stored = midi.write(kept)
  local info = midi.info(stored.hash)

  otel.record_metric("luanette.example.notes", info.notes, { model = "orpheus" })
  otel.record_metric("luanette.example.cpu_ms", (os.clock() - started) * 1000)
  log.info("phrase traced", { hash = stored.hash, notes = info.notes })

  return {
    hash = stored.hash,
    notes = midi.info(hash).notes,
    kept = info.notes,
    trace_id = otel.trace_id(),
    traceparent = otel.traceparent(),
  }
end
