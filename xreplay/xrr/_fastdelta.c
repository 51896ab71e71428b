/* A compiled twin of deltas.SnapshotCodecV2.decode: the replay's inner loop.
 *
 * Why: a 2.0 snapshot is a few bytes (flags, a time delta, probe, vCPU, region codes, one
 * or two delta runs), and decoding it in Python costs about 19,000 instructions, a third of
 * the replay.  This module decodes the ordinary frame, and only that, in C.
 *
 * The Python decoder stays the reference and the only voice of the format's errors: the C
 * path first checks the whole payload without changing anything, and on anything it does
 * not take (an error of any kind, a full region, a VarInt of more than 63 bits, more than
 * 32 regions) hands the frame to the reference untouched, with the state it holds written
 * back first and read again after.  So a frame decodes to the same fields, buffers, hulls
 * and errors through either path (tests/test_fastdelta.py holds the two equal on every
 * recording and on random and damaged frames).
 *
 * The format's constants are read from xreplay.xrr.format when the module loads: one
 * declaration of the format, not two.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

static long FLAG_KEYFRAME, FLAG_HAVE_SP, FLAG_HAVE_FLAGS, FLAG_REPEAT;
static long KNOWN_FLAGS, KNOWN_FLAGS_V2, MAX_VCPUS;
static long CODE_SAME, CODE_DELTA, CODE_FULL, CODE_ABSENT;

#define MAX_FAST_REGIONS 32 /* codes fit one uint64; more regions go to the reference */

/* A LEB128 VarInt at p[*i], bounded by end, of at most 63 bits; 0 when it is longer or runs
 * past end (the reference then says what is wrong). */
static inline int
varint(const unsigned char *p, Py_ssize_t *i, Py_ssize_t end, uint64_t *out)
{
    uint64_t value = 0;
    int shift = 0;
    Py_ssize_t j = *i;
    for (;;) {
        if (j >= end || shift > 56)
            return 0;
        unsigned char x = p[j++];
        value |= (uint64_t)(x & 0x7F) << shift;
        if (x < 0x80)
            break;
        shift += 7;
    }
    if (value >> 63)
        return 0;
    *out = value;
    *i = j;
    return 1;
}

typedef struct {
    PyObject_HEAD
    PyObject *ref;  /* the SnapshotCodecV2 this one speeds up */
    PyObject *regs; /* ref.regs: probe -> (pc, sp, regflags), shared with the reference */
    int64_t seq;    /* -1: no keyframe yet */
    int64_t t_ns;
    int ncodes;
    int delegate;   /* the state left the C range: every frame goes to the reference */
} Codec;

static int
codec_read_state(Codec *self)
{
    PyObject *seq = PyObject_GetAttrString(self->ref, "seq");
    PyObject *t = PyObject_GetAttrString(self->ref, "t_ns");
    int ok = 0;
    if (seq && t) {
        int o1 = 0, o2 = 0;
        long long s = PyLong_AsLongLongAndOverflow(seq, &o1);
        long long tv = PyLong_AsLongLongAndOverflow(t, &o2);
        if (!PyErr_Occurred()) {
            ok = 1;
            if (o1 || o2 || s < -1 || tv < 0) {
                self->delegate = 1;
            } else {
                self->seq = s;
                self->t_ns = tv;
            }
        }
    }
    Py_XDECREF(seq);
    Py_XDECREF(t);
    return ok ? 0 : -1;
}

static int
codec_write_state(Codec *self)
{
    PyObject *seq = PyLong_FromLongLong(self->seq);
    PyObject *t = PyLong_FromLongLong(self->t_ns);
    int rc = -1;
    if (seq && t && PyObject_SetAttrString(self->ref, "seq", seq) == 0
            && PyObject_SetAttrString(self->ref, "t_ns", t) == 0)
        rc = 0;
    Py_XDECREF(seq);
    Py_XDECREF(t);
    return rc;
}

static int
codec_init(Codec *self, PyObject *args, PyObject *kwds)
{
    PyObject *ref;
    if (!PyArg_ParseTuple(args, "O:DeltaCodecV2", &ref))
        return -1;
    PyObject *regs = PyObject_GetAttrString(ref, "regs");
    PyObject *nc = PyObject_GetAttrString(ref, "ncodes");
    if (!regs || !nc) {
        Py_XDECREF(regs);
        Py_XDECREF(nc);
        return -1;
    }
    if (!PyDict_CheckExact(regs)) {
        PyErr_SetString(PyExc_TypeError, "DeltaCodecV2: the reference's regs is not a dict");
        Py_DECREF(regs);
        Py_DECREF(nc);
        return -1;
    }
    long ncodes = PyLong_AsLong(nc);
    Py_DECREF(nc);
    if (ncodes == -1 && PyErr_Occurred()) {
        Py_DECREF(regs);
        return -1;
    }
    Py_INCREF(ref);
    Py_XSETREF(self->ref, ref);
    Py_XSETREF(self->regs, regs);
    self->ncodes = (int)ncodes;
    self->delegate = ncodes > MAX_FAST_REGIONS / 4 || ncodes < 1;
    return codec_read_state(self);
}

static void
codec_dealloc(Codec *self)
{
    Py_XDECREF(self->ref);
    Py_XDECREF(self->regs);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The reference decodes this frame: our state goes to it first and comes back after,
 * whether it returned or raised. */
static PyObject *
codec_delegate(Codec *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (!self->delegate && codec_write_state(self) < 0)
        return NULL;
    PyObject *decode = PyObject_GetAttrString(self->ref, "decode");
    if (!decode)
        return NULL;
    PyObject *res = PyObject_Vectorcall(decode, args, nargs, NULL);
    Py_DECREF(decode);
    if (!self->delegate) {
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        if (codec_read_state(self) < 0) {
            Py_XDECREF(res);
            Py_XDECREF(et);
            Py_XDECREF(ev);
            Py_XDECREF(tb);
            return NULL;
        }
        PyErr_Restore(et, ev, tb);
    }
    return res;
}

typedef struct {
    int region;
    Py_ssize_t start, stop; /* its runs: payload bytes */
    uint64_t first, end;    /* the hull: first byte rewritten, end of the last run */
    int any;                /* it holds a run (else the hull is (0, 0)) */
} DeltaAt;

/* decode(b, i, end, bufs, sizes, nprobes, hulls): as SnapshotCodecV2.decode. */
static PyObject *
codec_decode(Codec *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "decode takes 7 arguments");
        return NULL;
    }
    if (self->delegate)
        return codec_delegate(self, args, nargs);
    PyObject *b = args[0], *bufs = args[3], *sizes = args[4], *hulls = args[6];
    if (!PyBytes_CheckExact(b) || !PyLong_CheckExact(args[1]) || !PyLong_CheckExact(args[2])
            || !PyList_CheckExact(bufs) || !PyList_CheckExact(sizes)
            || !PyList_CheckExact(hulls) || !PyLong_CheckExact(args[5]))
        return codec_delegate(self, args, nargs);
    Py_ssize_t i = PyLong_AsSsize_t(args[1]);
    Py_ssize_t end = PyLong_AsSsize_t(args[2]);
    long nprobes = PyLong_AsLong(args[5]);
    if (PyErr_Occurred()) {  /* out of range: the reference says what is wrong */
        PyErr_Clear();
        return codec_delegate(self, args, nargs);
    }
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(b);
    if (i < 0 || end > PyBytes_GET_SIZE(b) || i >= end)
        return codec_delegate(self, args, nargs);
    Py_ssize_t nbufs = PyList_GET_SIZE(bufs);
    if (PyList_GET_SIZE(sizes) < nbufs || PyList_GET_SIZE(hulls) < nbufs)
        return codec_delegate(self, args, nargs);

    /* -- check everything, change nothing -- */
    long flags = p[i];
    uint64_t seq, t, probe, vcpu, pc = 0, sp = 0, regflags = 0;
    int64_t t_ns;
    if (flags & ~KNOWN_FLAGS_V2)
        return codec_delegate(self, args, nargs);
    int keyframe = (flags & FLAG_KEYFRAME) != 0;
    i += 1;
    if (keyframe) {
        if (!varint(p, &i, end, &seq) || !varint(p, &i, end, &t))
            return codec_delegate(self, args, nargs);
        t_ns = (t & 1) ? -(int64_t)(t >> 1) - 1 : (int64_t)(t >> 1);
    } else {
        if (self->seq < 0 || self->seq == INT64_MAX)
            return codec_delegate(self, args, nargs);
        seq = (uint64_t)self->seq + 1;
        if (!varint(p, &i, end, &t))
            return codec_delegate(self, args, nargs);
        int64_t d = (t & 1) ? -(int64_t)(t >> 1) - 1 : (int64_t)(t >> 1);
        if (__builtin_add_overflow(self->t_ns, d, &t_ns))
            return codec_delegate(self, args, nargs);
    }
    if (t_ns < 0 || (seq >> 63))
        return codec_delegate(self, args, nargs);
    if (!varint(p, &i, end, &probe) || !varint(p, &i, end, &vcpu)
            || probe >= (uint64_t)nprobes || vcpu >= (uint64_t)MAX_VCPUS)
        return codec_delegate(self, args, nargs);
    PyObject *repeated = NULL; /* borrowed: the probe's (pc, sp, regflags) */
    if (flags & FLAG_REPEAT) {
        if (keyframe)  /* a keyframe forgets every probe's registers first */
            return codec_delegate(self, args, nargs);
        PyObject *key = PyLong_FromUnsignedLongLong(probe);
        if (!key)
            return NULL;
        repeated = PyDict_GetItemWithError(self->regs, key);
        Py_DECREF(key);
        if (!repeated) {
            if (PyErr_Occurred())
                return NULL;
            return codec_delegate(self, args, nargs);
        }
        if (!PyTuple_CheckExact(repeated) || PyTuple_GET_SIZE(repeated) != 3)
            return codec_delegate(self, args, nargs);
    } else {
        if (!varint(p, &i, end, &pc))
            return codec_delegate(self, args, nargs);
        if ((flags & FLAG_HAVE_SP) && !varint(p, &i, end, &sp))
            return codec_delegate(self, args, nargs);
        if ((flags & FLAG_HAVE_FLAGS) && !varint(p, &i, end, &regflags))
            return codec_delegate(self, args, nargs);
    }
    int ncodes = self->ncodes;
    if (i + ncodes > end)
        return codec_delegate(self, args, nargs);
    uint64_t codes = 0;
    for (int k = 0; k < ncodes; k++)
        codes |= (uint64_t)p[i + k] << (8 * k);
    i += ncodes;
    uint64_t touched = 0, unread = 0;
    DeltaAt deltas[MAX_FAST_REGIONS];
    int ndeltas = 0;
    for (int region = 0; codes; codes >>= 2, region++) {
        long code = (long)(codes & 3);
        if (code == CODE_DELTA) {
            uint64_t n;
            if (!varint(p, &i, end, &n) || n > (uint64_t)(end - i) || region >= nbufs)
                return codec_delegate(self, args, nargs);
            PyObject *buf = PyList_GET_ITEM(bufs, region);
            PyObject *size_o = PyList_GET_ITEM(sizes, region);
            if (!PyByteArray_CheckExact(buf) || !PyLong_CheckExact(size_o))
                return codec_delegate(self, args, nargs);
            Py_ssize_t size = PyLong_AsSsize_t(size_o);
            if (size < 0 || (uint64_t)size <= n || PyByteArray_GET_SIZE(buf) != size) {
                if (PyErr_Occurred())
                    PyErr_Clear();
                return codec_delegate(self, args, nargs);
            }
            /* the runs: skip, length, bytes ..., each inside the region and the data */
            DeltaAt *d = &deltas[ndeltas++];
            Py_ssize_t j = i, stop = i + (Py_ssize_t)n;
            uint64_t at = 0;
            d->region = region;
            d->start = i;
            d->stop = stop;
            d->first = 0;
            d->any = 0;
            while (j < stop) {
                uint64_t skip, len;
                if (!varint(p, &j, stop, &skip) || !varint(p, &j, stop, &len)
                        || len > (uint64_t)(stop - j))
                    return codec_delegate(self, args, nargs);
                if (skip > (uint64_t)size || (at += skip) > (uint64_t)size
                        || len > (uint64_t)size - at)
                    return codec_delegate(self, args, nargs);
                if (!d->any) {
                    d->first = at;
                    d->any = 1;
                }
                at += len;
                j += (Py_ssize_t)len;
            }
            d->end = d->any ? at : 0;
            touched |= (uint64_t)1 << region;
            i = stop;
        } else if (code == CODE_FULL) {
            return codec_delegate(self, args, nargs); /* zlib: keyframes, the reference */
        } else if (region >= nbufs) {
            return codec_delegate(self, args, nargs);
        } else if (code == CODE_ABSENT) {
            unread |= (uint64_t)1 << region;
        }
    }
    if (i != end)
        return codec_delegate(self, args, nargs);

    /* -- the frame is good: build the result, then change the state -- */
    PyObject *o_pc, *o_sp, *o_rf;
    if (repeated) {
        o_pc = PyTuple_GET_ITEM(repeated, 0);
        o_sp = PyTuple_GET_ITEM(repeated, 1);
        o_rf = PyTuple_GET_ITEM(repeated, 2);
        Py_INCREF(o_pc);
        Py_INCREF(o_sp);
        Py_INCREF(o_rf);
    } else {
        o_pc = PyLong_FromUnsignedLongLong(pc);
        if (flags & FLAG_HAVE_SP) {
            o_sp = PyLong_FromUnsignedLongLong(sp);
        } else {
            o_sp = Py_None;
            Py_INCREF(o_sp);
        }
        if (flags & FLAG_HAVE_FLAGS) {
            o_rf = PyLong_FromUnsignedLongLong(regflags);
        } else {
            o_rf = Py_None;
            Py_INCREF(o_rf);
        }
    }
    PyObject *res = NULL, *regs_t = NULL, *key = NULL;
    PyObject *hull[MAX_FAST_REGIONS];
    int nhull = 0;
    if (!o_pc || !o_sp || !o_rf)
        goto fail;
    for (int k = 0; k < ndeltas; k++) { /* built before any byte moves */
        hull[k] = Py_BuildValue("(KK)", (unsigned long long)deltas[k].first,
                                (unsigned long long)deltas[k].end);
        if (!hull[k])
            goto fail;
        nhull++;
    }
    res = PyTuple_New(10);
    if (!res)
        goto fail;
    PyObject *items[10] = {
        PyLong_FromUnsignedLongLong(seq), PyLong_FromLongLong(t_ns),
        PyLong_FromUnsignedLongLong(probe), PyLong_FromUnsignedLongLong(vcpu),
        PyLong_FromLong(flags & KNOWN_FLAGS), o_pc, o_sp, o_rf,
        PyLong_FromUnsignedLongLong(touched), PyLong_FromUnsignedLongLong(unread)};
    o_pc = o_sp = o_rf = NULL; /* the tuple owns them now */
    int bad = 0;
    for (int k = 0; k < 10; k++) {
        if (!items[k])
            bad = 1;
        PyTuple_SET_ITEM(res, k, items[k] ? items[k] : (Py_INCREF(Py_None), Py_None));
    }
    if (bad)
        goto fail;
    if (!repeated) {
        key = PyTuple_GET_ITEM(res, 2);
        regs_t = PyTuple_Pack(3, PyTuple_GET_ITEM(res, 5), PyTuple_GET_ITEM(res, 6),
                              PyTuple_GET_ITEM(res, 7));
        if (!regs_t)
            goto fail;
        if (keyframe)
            PyDict_Clear(self->regs);
        if (PyDict_SetItem(self->regs, key, regs_t) < 0)
            goto fail;
        Py_CLEAR(regs_t);
    }
    /* nothing below can fail: the buffers move, the hulls go out, the state advances */
    for (int k = 0; k < ndeltas; k++) {
        PyObject *buf = PyList_GET_ITEM(bufs, deltas[k].region);
        unsigned char *out = (unsigned char *)PyByteArray_AS_STRING(buf);
        Py_ssize_t j = deltas[k].start, stop = deltas[k].stop;
        uint64_t at = 0;
        while (j < stop) {
            uint64_t skip, len;
            varint(p, &j, stop, &skip);
            varint(p, &j, stop, &len);
            at += skip;
            if (len == 1)
                out[at] = p[j];
            else
                memcpy(out + at, p + j, (size_t)len);
            at += len;
            j += (Py_ssize_t)len;
        }
        PyList_SetItem(hulls, deltas[k].region, hull[k]); /* steals */
        hull[k] = NULL;
    }
    self->seq = (int64_t)seq;
    self->t_ns = t_ns;
    return res;

fail:
    Py_XDECREF(o_pc);
    Py_XDECREF(o_sp);
    Py_XDECREF(o_rf);
    Py_XDECREF(res);
    Py_XDECREF(regs_t);
    for (int k = 0; k < nhull; k++)
        Py_XDECREF(hull[k]);
    return NULL;
}

static PyMethodDef codec_methods[] = {
    {"decode", (PyCFunction)(void (*)(void))codec_decode, METH_FASTCALL,
     "decode(b, i, end, bufs, sizes, nprobes, hulls): SnapshotCodecV2.decode, compiled."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef codec_members[] = {
    {"seq", T_LONGLONG, offsetof(Codec, seq), READONLY, "the last snapshot's number"},
    {"t_ns", T_LONGLONG, offsetof(Codec, t_ns), READONLY, "the last snapshot's time"},
    {"delegating", T_INT, offsetof(Codec, delegate), READONLY,
     "every frame goes to the reference (its state left the C range)"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject CodecType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "xreplay.xrr._fastdelta.DeltaCodecV2",
    .tp_basicsize = sizeof(Codec),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "DeltaCodecV2(reference): decodes 2.0 snapshots as the reference "
              "SnapshotCodecV2 does, sharing its state; frames it does not take go to it.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)codec_init,
    .tp_dealloc = (destructor)codec_dealloc,
    .tp_methods = codec_methods,
    .tp_members = codec_members,
};

static int
constant(PyObject *mod, const char *name, long *out)
{
    PyObject *v = PyObject_GetAttrString(mod, name);
    if (!v)
        return -1;
    *out = PyLong_AsLong(v);
    Py_DECREF(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static int
code_of(PyObject *fmt, const char *enc_name, long *out)
{
    PyObject *codes = PyObject_GetAttrString(fmt, "V2_CODES");
    PyObject *enc = codes ? PyObject_GetAttrString(fmt, enc_name) : NULL;
    PyObject *v = enc ? PyObject_GetItem(codes, enc) : NULL;
    int rc = -1;
    if (v) {
        *out = PyLong_AsLong(v);
        rc = (*out == -1 && PyErr_Occurred()) ? -1 : 0;
    }
    Py_XDECREF(codes);
    Py_XDECREF(enc);
    Py_XDECREF(v);
    return rc;
}

static struct PyModuleDef fastdelta_module = {
    PyModuleDef_HEAD_INIT, "_fastdelta",
    "The replay's 2.0 snapshot decoder, compiled (see deltas.SnapshotCodecV2).", -1, NULL,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__fastdelta(void)
{
    PyObject *fmt = PyImport_ImportModule("xreplay.xrr.format");
    if (!fmt)
        return NULL;
    int rc = constant(fmt, "FLAG_KEYFRAME", &FLAG_KEYFRAME)
        | constant(fmt, "FLAG_HAVE_SP", &FLAG_HAVE_SP)
        | constant(fmt, "FLAG_HAVE_FLAGS", &FLAG_HAVE_FLAGS)
        | constant(fmt, "FLAG_REPEAT_REGS", &FLAG_REPEAT)
        | constant(fmt, "SNAPSHOT_FLAGS_KNOWN", &KNOWN_FLAGS)
        | constant(fmt, "SNAPSHOT_FLAGS_KNOWN_V2", &KNOWN_FLAGS_V2)
        | constant(fmt, "MAX_VCPUS", &MAX_VCPUS)
        | code_of(fmt, "ENC_SAME", &CODE_SAME) | code_of(fmt, "ENC_DELTA", &CODE_DELTA)
        | code_of(fmt, "ENC_FULL", &CODE_FULL) | code_of(fmt, "ENC_ABSENT", &CODE_ABSENT);
    Py_DECREF(fmt);
    if (rc)
        return NULL;
    if (PyType_Ready(&CodecType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fastdelta_module);
    if (!m)
        return NULL;
    Py_INCREF(&CodecType);
    if (PyModule_AddObject(m, "DeltaCodecV2", (PyObject *)&CodecType) < 0) {
        Py_DECREF(&CodecType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
