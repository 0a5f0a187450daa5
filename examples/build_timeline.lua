-- build_timeline.lua (seed 002): place a region, move it, list the timeline.
-- Create a 4-bar loop region
local region_id = garden.create_region({
    position = 0,
    duration = 16,  -- 4 bars at 4/4
    behavior = "play_content",
    content_id = "artifact_abc123"
})
print("Created region: " .. region_id)

-- Move it to bar 5
garden.move_region(region_id, 16)

-- Both edits are in this run's session overlay (get_regions would already show them);
-- commit them to the garden now, so the listing carries the garden's region ids
core.commit()

-- List all regions
local regions = garden.get_regions()
for i, r in ipairs(regions) do
    print(string.format("Region %d: %s at beat %.1f", i, r.region_id, r.position))
end
return regions
