/*
 * A key release's eight PKCS#11 calls in one C call (see p11direct.py, "One call per re-wrap").
 *
 * Called through ctypes, which gives up the interpreter lock for the whole call and takes it back
 * once, instead of around each of the six entry points: with sixteen request threads waiting for
 * the lock, each retake was a wait and two context switches. The calls, templates, mechanisms and
 * order are the Python path's; nothing here allocates, keeps state or reads a secret. The last
 * call is the read that tells the caller whether the key version is still enabled (its enabler's
 * label, or its KEK's CKA_UNWRAP): made here, it no longer costs a foreign call and a retake of
 * the lock of its own; the caller judges what it read. The first is the same read, compared with
 * what the caller's lookup found: a version disabled before the call is refused before anything
 * is unwrapped.
 *
 * The PKCS#11 types are spelled out (CK_ULONG is `unsigned long` on the Unix ABIs PKCS#11
 * defines) so that no header is needed to build this file.
 */

/*
 * What this library does, as one number: p11direct.py (RELEASE_CALLS_VERSION) refuses a library
 * whose sr_p11release_version() is not the one it was written for. Bump it with every change a
 * caller could tell apart: arguments, steps, their order, what is returned or written, which
 * failure is reported (a change of comments or formatting alone keeps it), and bump
 * RELEASE_CALLS_VERSION with it. A library built before the change keeps its function's name and
 * arguments and would otherwise load silently from a stale build. tests/keybroker/
 * test_release_source.py records each version's hash of this file (comments and whitespace
 * aside) and fails on a change of the code that kept the number.
 */
#define SR_P11RELEASE_VERSION 2

typedef unsigned long ck_ulong;

typedef struct {
    ck_ulong type;
    void *value;
    ck_ulong length;
} ck_attribute;

typedef struct {
    ck_ulong mechanism;
    void *parameter;
    ck_ulong length;
} ck_mechanism;

/* The five entry points used, taken from the module's CK_FUNCTION_LIST by the caller. */
typedef struct {
    ck_ulong (*unwrap_key)(ck_ulong, ck_mechanism *, ck_ulong, unsigned char *, ck_ulong,
                           ck_attribute *, ck_ulong, ck_ulong *);
    ck_ulong (*get_attribute_value)(ck_ulong, ck_ulong, ck_attribute *, ck_ulong);
    ck_ulong (*create_object)(ck_ulong, ck_attribute *, ck_ulong, ck_ulong *);
    ck_ulong (*wrap_key)(ck_ulong, ck_mechanism *, ck_ulong, ck_ulong, unsigned char *,
                         ck_ulong *);
    ck_ulong (*destroy_object)(ck_ulong, ck_ulong);
} sr_entry_points;

/*
 * Which call a non-zero return value came from (`*step`); SR_WRONG_LENGTH and SR_STATE_CHANGED
 * come with 0.
 */
enum {
    SR_DONE = 0,
    SR_UNWRAP = 1,
    SR_WRONG_LENGTH = 2,
    SR_IMPORT = 3,
    SR_WRAP = 4,
    SR_DESTROY_PUBLIC = 5,
    SR_DESTROY_KEY = 6,
    SR_READ_LENGTH = 7,
    SR_READ_STATE = 8,
    SR_CHECK_STATE = 9,
    SR_STATE_CHANGED = 10,
};

#define CKA_VALUE_LEN 0x161UL
/* The C_GetAttributeValue answers that mean "this token cannot tell the length": nothing wrong. */
#define CKR_ATTRIBUTE_SENSITIVE 0x11UL
#define CKR_ATTRIBUTE_TYPE_INVALID 0x12UL

/* Whether the `length` bytes at `a` and `b` are equal (no header needed, as for the types). */
static int same_bytes(const unsigned char *a, const unsigned char *b, ck_ulong length)
{
    ck_ulong i;

    for (i = 0; i < length; i++)
        if (a[i] != b[i])
            return 0;
    return 1;
}

/*
 * Unwraps `wrapped` under `unwrapping_key` into a session object made from `key_template`; checks
 * its CKA_VALUE_LEN is 0 (unreported) or `key_length` (a token that cannot tell, answering
 * CKR_ATTRIBUTE_TYPE_INVALID or CKR_ATTRIBUTE_SENSITIVE, is not held to it; any other failure of
 * that read is returned with `*step` SR_READ_LENGTH, the key destroyed, or SR_DESTROY_KEY with
 * the destroy's CK_RV if it could not be); imports the caller's public key from
 * `public_template`; wraps the unwrapped key to it into `out` (`*out_length` in: its size, out: the
 * length written); destroys both objects, whatever happened. Returns the first failing call's
 * CK_RV with `*step` naming the call, unless a destroy failed: then the destroy's CK_RV with
 * SR_DESTROY_PUBLIC or SR_DESTROY_KEY (that object may still exist in the session), whatever
 * failed before it; or 0 with `*step` SR_DONE, or 0 with SR_WRONG_LENGTH when the unwrapped key
 * had another length (it is destroyed: the blob is not this key's).
 *
 * Once all that succeeded, and only then, reads `*state` (one attribute, into the caller's buffer)
 * of `state_object` when `state` is not NULL: after the wrap, so that a disable that returned
 * while the token unwrapped and wrapped is seen (the caller drops the answer). A failed read
 * returns its CK_RV with `*step` SR_READ_STATE and `*out_length` 0; the objects are gone by then.
 *
 * When `enabled` is not NULL too, the same read is made first, before the unwrap: a failed read
 * returns its CK_RV with `*step` SR_CHECK_STATE, and a value other than the `enabled_length`
 * bytes at `enabled` (what the caller's lookup read from an enabled version) returns 0 with
 * `*step` SR_STATE_CHANGED, the value read left in `*state` for the caller to judge; either way
 * `*out_length` is 0 and nothing was unwrapped. A version already disabled is so refused
 * without its data key ever being unwrapped; the read after the wrap still catches a disable
 * landing during the call.
 */
ck_ulong sr_rewrap_read(const sr_entry_points *p11, ck_ulong session,
                        ck_mechanism *unwrap_mechanism, ck_ulong unwrapping_key,
                        unsigned char *wrapped, ck_ulong wrapped_length,
                        ck_attribute *key_template, ck_ulong key_count, ck_ulong key_length,
                        ck_attribute *public_template, ck_ulong public_count,
                        ck_mechanism *wrap_mechanism, unsigned char *out, ck_ulong *out_length,
                        ck_ulong state_object, ck_attribute *state,
                        const unsigned char *enabled, ck_ulong enabled_length, int *step)
{
    ck_ulong key = 0, public_key = 0, length = 0, rv, cleanup;
    ck_attribute query = {CKA_VALUE_LEN, &length, sizeof length};

    if (state && enabled) {
        ck_ulong capacity = state->length;

        *step = SR_CHECK_STATE;
        rv = p11->get_attribute_value(session, state_object, state, 1);
        if (rv != 0) {
            *out_length = 0;
            return rv;
        }
        if (state->length != enabled_length || !same_bytes(state->value, enabled, enabled_length)) {
            *out_length = 0;
            *step = SR_STATE_CHANGED;
            return 0;
        }
        state->length = capacity; /* the read after the wrap gets the whole buffer again */
    }
    *step = SR_UNWRAP;
    rv = p11->unwrap_key(session, unwrap_mechanism, unwrapping_key, wrapped, wrapped_length,
                         key_template, key_count, &key);
    if (rv != 0)
        return rv;
    /*
     * A token that cannot tell the length is not held to it (SoftHSM2 reports 0). Any other failure
     * (the session, the device or the new object gone) is the failure: going on would skip the
     * check and report the next call's error, or none, in its place.
     */
    rv = p11->get_attribute_value(session, key, &query, 1);
    if (rv == CKR_ATTRIBUTE_TYPE_INVALID || rv == CKR_ATTRIBUTE_SENSITIVE) {
        length = 0;
    } else if (rv != 0) {
        /* The read's failure is reported, unless the key could not be destroyed: that is worse. */
        *step = SR_READ_LENGTH;
        cleanup = p11->destroy_object(session, key);
        if (cleanup != 0) {
            *step = SR_DESTROY_KEY;
            rv = cleanup;
        }
        return rv;
    }
    if (length != 0 && length != key_length) {
        *step = SR_DESTROY_KEY;
        rv = p11->destroy_object(session, key);
        if (rv == 0)
            *step = SR_WRONG_LENGTH;
        return rv;
    }
    /*
     * A destroy's failure is reported over the import's or the wrap's, as over the length read's:
     * the object may still be in the session, which the caller must then close (a refused target
     * alone leaves the session in use).
     */
    *step = SR_IMPORT;
    rv = p11->create_object(session, public_template, public_count, &public_key);
    if (rv == 0) {
        *step = SR_WRAP;
        rv = p11->wrap_key(session, wrap_mechanism, public_key, key, out, out_length);
        cleanup = p11->destroy_object(session, public_key);
        if (cleanup != 0) {
            *step = SR_DESTROY_PUBLIC;
            rv = cleanup;
        }
    }
    cleanup = p11->destroy_object(session, key);
    if (cleanup != 0) {
        *step = SR_DESTROY_KEY;
        rv = cleanup;
    }
    if (rv != 0)
        return rv;
    if (state) {
        *step = SR_READ_STATE;
        rv = p11->get_attribute_value(session, state_object, state, 1);
        if (rv != 0) {
            *out_length = 0;
            return rv;
        }
    }
    *step = SR_DONE;
    return 0;
}

/* SR_P11RELEASE_VERSION; its name and signature never change, so any build can be asked. */
int sr_p11release_version(void)
{
    return SR_P11RELEASE_VERSION;
}
