-- orchestrate_generation.lua (seed 002): walk a latent region through its lifecycle
-- by hand, then approve what it produced.
-- Create a latent region for AI generation
local region_id = garden.create_region({
    position = 0,
    duration = 8,
    behavior = "latent",
    content_id = "job_orpheus_001"
})

-- The region is in this run's session overlay: the latent lifecycle needs it in the
-- garden, so commit now and go on with the id the garden gave it
region_id = core.commit().created[region_id]

-- Simulate job progress (in real use, this would be from orpheus callbacks)
garden.latent_started(region_id, "job_orpheus_001")

for progress = 0.1, 1.0, 0.1 do
    garden.latent_progress(region_id, progress)
    -- In real code: wait for actual progress
end

-- Mark resolved with generated artifact
garden.latent_resolved(region_id, {
    artifact_id = "artifact_generated_xyz",
    content_hash = "sha256:abc123...",
    content_type = "audio"
})

-- Check pending approvals
local pending = garden.get_pending()
if #pending > 0 then
    print("Pending approval: " .. pending[1].artifact_id)

    -- Auto-approve (or wait for human decision)
    local my_agent_id = "00000000-0000-0000-0000-000000000001"
    garden.approve(pending[1].region_id, my_agent_id)
end
return {region_id = region_id, approved = #pending > 0}
