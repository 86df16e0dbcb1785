/* registry.h — the requests the server knows by id (internal to server/).
 *
 * An entry is embedded in the caller's record (first member, so the record
 * pointer and the entry pointer are one). The registry finds an entry by id
 * in O(1), counts each tenant's Step-collected entries (so that one tenant
 * cannot pile up results without bound), and keeps finished entries in the
 * order they finished, so that expiring the oldest costs nothing per step.
 * Not thread-safe: the server calls it under its request lock (srv.rq_mu). */
#ifndef KVSERVE_REGISTRY_H
#define KVSERVE_REGISTRY_H

#include <stddef.h>
#include <stdint.h>

typedef struct srv_reg_entry {
    uint64_t id;
    char tenant[256];
    int collected_by_step;          /* counts against its tenant's bound (not a Stream's) */
    int done;                       /* finished, its result waiting to be collected */
    double done_at;
    struct srv_reg_entry *hnext;    /* hash chain */
    struct srv_reg_entry *prev, *next;          /* every entry */
    struct srv_reg_entry *dprev, *dnext;        /* finished entries, oldest first */
} srv_reg_entry;

typedef struct srv_reg srv_reg;

srv_reg *srv__reg_new(void);
/* Frees the registry only; entries belong to their records. */
void srv__reg_free(srv_reg *g);

/* Add e (id, tenant and collected_by_step set). 0, or -1 when out of memory. */
int srv__reg_add(srv_reg *g, srv_reg_entry *e);
/* The entry of id, or NULL. O(1). */
srv_reg_entry *srv__reg_find(srv_reg *g, uint64_t id);
/* Take e out (it stays allocated). O(1). */
void srv__reg_remove(srv_reg *g, srv_reg_entry *e);
/* e finished at `now`: it joins the end of the finished list. */
void srv__reg_done(srv_reg *g, srv_reg_entry *e, double now);
/* The oldest finished entry if it finished before `before`, else NULL. */
srv_reg_entry *srv__reg_oldest_done_before(srv_reg *g, double before);
/* Step-collected entries of a tenant (running or finished, not yet collected). */
int srv__reg_tenant_count(const srv_reg *g, const char *tenant);
/* Step-collected entries that have not finished yet. */
size_t srv__reg_running_steps(const srv_reg *g);
/* When the most recently finished entry still waiting to be collected finished; -1 if none waits. */
double srv__reg_newest_done_at(const srv_reg *g);
/* Iteration over every entry: first, then next(e) (remove only the current one after taking next). */
srv_reg_entry *srv__reg_first(srv_reg *g);
size_t srv__reg_size(const srv_reg *g);

#endif
