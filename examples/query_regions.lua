-- query_regions.lua (seed 002, adapted): list the latent regions and their state.
-- Seed 002 wrote this with garden.query (a Trustfall query on chaosgarden's query
-- socket), which the shell protocol does not carry; garden.get_regions gives the same
-- rows here.
local results = {}
for _, region in ipairs(garden.get_regions()) do
    if region.is_latent then
        results[#results + 1] = {id = region.region_id, position = region.position}
    end
end

for _, row in ipairs(results) do
    print(string.format("Latent region %s at %.1f", row.id, row.position))
end
return results
