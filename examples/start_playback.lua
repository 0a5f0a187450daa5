-- start_playback.lua (seed 002): set the tempo, rewind and play.
garden.set_tempo(120)
garden.seek(0)
garden.play()

-- Wait and check status
local status = garden.status()
print(string.format("Playing: %s, Position: %.2f beats",
    tostring(status.playing), status.position))
return status
